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

# Debian packages, each with one program that tells whether it is installed: what the tests
# need everywhere (dmsetup only as a test oracle), and what the guest needs on top
TEST_APT := e2fsprogs:mkfs.ext4 xfsprogs:mkfs.xfs btrfs-progs:mkfs.btrfs dmsetup:dmsetup
GUEST_APT := qemu-system-x86:qemu-system-x86_64 busybox-static:busybox cpio:cpio xz-utils:xz kmod:modprobe
define apt_install
	@missing=""; for pair in $(1); do \
	    PATH="$$PATH:/usr/sbin:/sbin" command -v $${pair#*:} >/dev/null 2>&1 || missing="$$missing $${pair%%:*}"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "make deps: installing Debian packages:$$missing"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $$missing >/dev/null || exit 1; \
	fi
endef

.PHONY: deps vm-deps test unit kernel vm-test vm-shell demo bench clean

# the guest only where the kernel tests cannot run natively
deps: $(if $(NATIVE),,vm-deps)
	$(call apt_install,$(TEST_APT))
	@cd / && $(PY) $(CURDIR)/scripts/check-install $(CURDIR) || { \
	    echo "make deps: installing dmflakey-ioctl (editable) and pytest"; \
	    PIP_ROOT_USER_ACTION=ignore PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
	        $(PY) -m pip install -q -e '$(CURDIR)[test]' || exit 1; }

vm-deps:
	$(call apt_install,$(GUEST_APT))
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

vm-test: deps vm-deps
	$(VM) -- $(PY) -m pytest $(PYTEST_GUEST_OPTS) tests/kernel -q

vm-shell: deps vm-deps
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
