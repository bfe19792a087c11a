"""A hostile guest's raw descriptor stores, shared by the hostile-ring tests."""


def poke_desc(region, desc_gpa, i, addr, length, flags=0, next=0):
    """Write descriptor i of the table at desc_gpa field by field."""
    d = desc_gpa + 16 * i
    region.poke(d, addr, 8)
    region.poke(d + 8, length, 4)
    region.poke(d + 12, flags, 2)
    region.poke(d + 14, next, 2)
