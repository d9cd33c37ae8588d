"""Device-mapper target parameter strings: build, check and parse them.

One module per target type.  These are pure functions of their arguments: no
ioctl, no file access, so that a table can be checked before anything changes.
"""
