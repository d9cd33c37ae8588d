# dmflakey-ioctl: the commands a developer and CI need.
#   make test      deps, unit tests natively, then the kernel tests (natively as root
#                  where the host kernel has dm-flakey, otherwise inside the QEMU guest)
#   make vm-test   the kernel tests, always inside the guest
#   make vm-shell  an interactive root shell inside the guest
#   make demo      the power-failure demo (natively or in the guest)
#   make bench     benchmarks against dmsetup (natively or in the guest)

PYTHON ?= python3
PY := $(shell $(PYTHON) -c 'import sys; print(sys.executable)')
PYTEST_GUEST_OPTS := -p no:cacheprovider --color=no
VM := $(PY) scripts/vm
NATIVE := $(shell $(PY) scripts/native-dm >/dev/null 2>&1 && echo yes)

APT_PACKAGES := qemu-system-x86 busybox-static cpio xz-utils kmod e2fsprogs xfsprogs btrfs-progs dmsetup
# one program per package above, to tell whether it is installed
APT_PROGRAMS := qemu-system-x86_64 busybox cpio xz modprobe mkfs.ext4 mkfs.xfs mkfs.btrfs dmsetup

.PHONY: deps test unit kernel vm-test vm-shell demo bench clean

deps:
	@missing=""; for p in $(APT_PROGRAMS); do \
	    PATH="$$PATH:/usr/sbin:/sbin" command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    echo "make deps: installing Debian packages (missing:$$missing)"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $(APT_PACKAGES) >/dev/null || exit 1; \
	fi
	@$(PY) -c 'import pytest, dmflakey_ioctl.cli' 2>/dev/null && \
	    $(PY) -c 'import dmflakey_ioctl, os, sys; sys.exit(0 if os.path.dirname(dmflakey_ioctl.__file__) == os.path.abspath("dmflakey_ioctl") else 1)' 2>/dev/null || { \
	    echo "make deps: installing dmflakey-ioctl (editable) and pytest"; \
	    $(PY) -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]' || exit 1; }
	@$(VM) --fetch >/dev/null 2>&1 || $(VM) --fetch

test: deps unit kernel

unit:
	$(PY) -m pytest tests/unit -q

kernel:
ifeq ($(NATIVE),yes)
	$(PY) -m pytest tests/kernel -q
else
	$(VM) -- $(PY) -m pytest $(PYTEST_GUEST_OPTS) tests/kernel -q
endif

vm-test: deps
	$(VM) -- $(PY) -m pytest $(PYTEST_GUEST_OPTS) tests/kernel -q

vm-shell: deps
	$(VM)

demo: deps
ifeq ($(NATIVE),yes)
	$(PY) -m dmflakey_ioctl demo
else
	$(VM) -- $(PY) -m dmflakey_ioctl demo
endif

# the kernel parts run where dm-flakey is; the import time is always measured on this host
bench: deps
ifeq ($(NATIVE),yes)
	$(PY) scripts/bench --out bench.json
else
	$(VM) -- $(PY) scripts/bench --out /run/dmflakey-vm/out/bench.json
endif
	$(PY) scripts/bench --import-only --out bench.json

clean:
	rm -rf build dist *.egg-info .pytest_cache
