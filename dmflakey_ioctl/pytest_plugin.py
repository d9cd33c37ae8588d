"""pytest plugin: fixtures `flakey` and `flakey_factory` (see README)."""
