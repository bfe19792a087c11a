"""Who serves a device: its daemon's identity, kept where no guest can write.

A daemon holds an exclusive flock on its pidfile, ``RUNDIR/NAME.pid`` (mode
0600, its pid inside), for its whole life.  ``stop``, ``status`` and "is it
alive" ask that file and its lock, never the region's header.  RUNDIR is
``/run/virtio_py`` for root, else ``$XDG_RUNTIME_DIR/virtio_py`` (or
``/tmp/virtio_py-UID`` without one); it must be a directory of this user
that no one else may write, and is made 0700 if missing.

Who holds the lock is read from /proc/locks, so asking never takes the lock
(which would make a daemon starting at that moment fail).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass

from .errors import ConfigError, RegionError
from .proc import flock_holder
from .region import check_name


def runtime_dir() -> str:
    """Where this user's daemons keep their pidfiles."""
    if os.geteuid() == 0:
        return "/run/virtio_py"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "virtio_py")
    return f"/tmp/virtio_py-{os.geteuid()}"


def _open_runtime_dir(create: bool) -> int | None:
    """An fd of the runtime directory, checked; None if it does not exist
    and create is false."""
    path = runtime_dir()
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise ConfigError(f"cannot create {path}: {e.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            return None
        raise ConfigError(f"cannot open {path}: it vanished") from None
    except OSError as e:
        raise ConfigError(f"cannot open {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise ConfigError(
            f"{path} belongs to uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}: "
            "it must be this user's and writable by no one else"
        )
    return fd


def _pidfile_name(name: str) -> str:
    return f"{check_name(name)}.pid"


def _read_pid(fd: int) -> int:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        pid = int(text)
    except (OSError, ValueError, UnicodeDecodeError):
        return 0
    return pid if pid > 0 else 0


@dataclass
class DaemonState:
    """What the pidfile of a name says: the daemon's pid (0: unknown) and
    whether it still holds its lock."""

    pid: int
    alive: bool


def probe(name: str) -> DaemonState | None:
    """The state of name's daemon, or None if no pidfile exists."""
    dirfd = _open_runtime_dir(create=False)
    if dirfd is None:
        return None
    try:
        try:
            fd = os.open(
                _pidfile_name(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd
            )
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ConfigError(f"cannot open the pidfile of {name!r}: {e.strerror}") from None
    finally:
        os.close(dirfd)
    try:
        holder = flock_holder(fd)
        pid = _read_pid(fd)
    finally:
        os.close(fd)
    if holder is None:
        return DaemonState(pid, False)
    # The holder is the daemon itself; its file says the same unless it
    # runs in a pid namespace we cannot see into.
    return DaemonState(holder or pid, True)


def _names(dirfd: int, file: str, fd: int) -> bool:
    """Does file in dirfd (not followed if a symlink) still lead to fd's file?"""
    st = os.fstat(fd)
    try:
        now = os.stat(file, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


class PidFile:
    """The lock on a name: held by its daemon from before it creates
    anything until after it removed everything."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._file = _pidfile_name(name)
        self._dirfd: int | None = None
        self._fd: int | None = None
        self.previous_pid = 0  # of the daemon that held it before, if any

    @classmethod
    def acquire(cls, name: str, pid: int | None = None) -> PidFile:
        """Take name for this process (or write pid into it); RegionError if
        a live daemon holds it."""
        p = cls(name)
        p._dirfd = _open_runtime_dir(create=True)
        try:
            p._lock(os.getpid() if pid is None else pid)
        except BaseException:
            p.release()
            raise
        return p

    def _lock(self, pid: int) -> None:
        assert self._dirfd is not None
        for _ in range(100):
            fd = os.open(
                self._file,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self._dirfd,
            )
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    raise ConfigError(f"pidfile of {self.name!r} is not a file of this user")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = flock_holder(fd) or _read_pid(fd)
                    raise RegionError(
                        f"a daemon already serves {self.name!r} (pid {holder})"
                    ) from None
                # Locked; but a holder that was exiting may have unlinked
                # the file we opened: the lock counts only on the file the
                # name still leads to.
                if not _names(self._dirfd, self._file, fd):
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self.previous_pid = _read_pid(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{pid}\n".encode(), 0)
            return
        raise RegionError(f"the pidfile of {self.name!r} keeps changing")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the pidfile (while still holding it) and let go."""
        if self._fd is not None:
            assert self._dirfd is not None
            try:
                if _names(self._dirfd, self._file, self._fd):
                    os.unlink(self._file, dir_fd=self._dirfd)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
            finally:
                os.close(self._fd)
                self._fd = None
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None


# The daemon's private records beside its pidfile (0600, in RUNDIR, written
# by the daemon alone): NAME.layout, what it laid out (JSON), and
# NAME.inflight, its queues' in-flight record.  They outlive a daemon that
# died, for a successor to take its device over; a clean stop removes them.
RECORDS = ("layout", "inflight")


def _record_name(name: str, kind: str) -> str:
    assert kind in RECORDS
    return f"{check_name(name)}.{kind}"


def write_record(pidfile: PidFile, kind: str, data: bytes) -> None:
    """Replace NAME.kind whole (a new file renamed over it), 0600."""
    assert pidfile._dirfd is not None
    final = _record_name(pidfile.name, kind)
    tmp = f".{final}.{os.getpid()}"
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=pidfile._dirfd,
    )
    try:
        os.write(fd, data)
        os.rename(tmp, final, src_dir_fd=pidfile._dirfd, dst_dir_fd=pidfile._dirfd)
    except BaseException:
        os.unlink(tmp, dir_fd=pidfile._dirfd)
        raise
    finally:
        os.close(fd)


def open_record(pidfile: PidFile, kind: str, create_size: int | None = None) -> int | None:
    """An fd (read-write) of NAME.kind, checked to be a regular file of this
    user, mode 0600; None if missing.  create_size: make it anew, zeroed,
    of that size."""
    assert pidfile._dirfd is not None
    n = _record_name(pidfile.name, kind)
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    if create_size is not None:
        try:
            os.unlink(n, dir_fd=pidfile._dirfd)
        except FileNotFoundError:
            pass
        flags |= os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(n, flags, 0o600, dir_fd=pidfile._dirfd)
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise ConfigError(f"{n} in {runtime_dir()} is not a private file of this user")
    if create_size is not None:
        os.ftruncate(fd, create_size)
    return fd


def has_record(name: str, kind: str) -> bool:
    """Does NAME.kind exist (a daemon that can be taken over made the device)?"""
    try:
        return os.path.isfile(os.path.join(runtime_dir(), _record_name(name, kind)))
    except ConfigError:
        return False


def read_record(pidfile: PidFile, kind: str, limit: int = 1 << 20) -> bytes | None:
    fd = open_record(pidfile, kind)
    if fd is None:
        return None
    try:
        return os.pread(fd, limit, 0)
    finally:
        os.close(fd)


def remove_records(pidfile: PidFile) -> None:
    """Remove NAME's records (held pidfile: no daemon uses them)."""
    assert pidfile._dirfd is not None
    _unlink_records(pidfile._dirfd, pidfile.name)


def _unlink_records(dirfd: int, name: str) -> None:
    for kind in RECORDS:
        try:
            os.unlink(_record_name(name, kind), dir_fd=dirfd)
        except FileNotFoundError:
            pass


def take_over_dead(name: str) -> PidFile | None:
    """The lock of a name whose daemon is gone, to clean up after it; None if
    a live daemon holds it."""
    try:
        return PidFile.acquire(name)
    except RegionError:
        return None


def remove_stale(name: str) -> bool:
    """Remove the pidfile a dead daemon of this name left (never a held
    one); True if there was one."""
    try:
        dirfd = _open_runtime_dir(create=False)
    except ConfigError:
        return False
    if dirfd is None:
        return False
    try:
        fd = os.open(_pidfile_name(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        os.close(dirfd)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _names(dirfd, _pidfile_name(name), fd):
            return False
        _unlink_records(dirfd, name)
        os.unlink(_pidfile_name(name), dir_fd=dirfd)
        return True
    except OSError:  # held (BlockingIOError), or gone meanwhile
        return False
    finally:
        os.close(fd)
        os.close(dirfd)


__all__ = [
    "DaemonState",
    "PidFile",
    "has_record",
    "open_record",
    "probe",
    "read_record",
    "remove_records",
    "remove_stale",
    "runtime_dir",
    "take_over_dead",
    "write_record",
]
