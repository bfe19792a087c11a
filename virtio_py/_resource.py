"""The one way our handles end: close() on leaving a with block, and when
the object is collected."""


class Closeable:
    def close(self):
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
