"""Thin wrappers over kernel interfaces: device-mapper and loop ioctls, device nodes.

Nothing here knows about flakey devices or recordings: each module speaks one
kernel interface, refuses bad input before the kernel sees it, and turns the
kernel's answers into the library's errors.
"""
