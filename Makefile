# dmflakey-ioctl: the commands a developer and CI need.
#   make test      deps, unit tests natively, then the kernel tests (natively as root
#                  where the host kernel has dm-flakey, otherwise inside the QEMU guest)
#   make test-kernels  the kernel tests in the guest on each kernel of the matrix (6.12, 6.1, 5.10)
#   make vm-test   the kernel tests, always inside the guest (KERNEL=6.1 for another kernel)
#   make vm-shell  an interactive root shell inside the guest
#   make demo      the power-failure demo (natively or in the guest)
#   make bench     benchmarks against dmsetup (natively or in the guest)

PYTHON ?= python3
PY := $(shell $(PYTHON) -c 'import sys; print(sys.executable)')
PYTEST_GUEST_OPTS := -p no:cacheprovider --color=no --durations=15
# the guest's kernel: 6.12 (default), 6.1 or 5.10 (scripts/vm --kernel-package)
KERNEL ?= 6.12
KERNELS := 6.12 6.1 5.10
VM := $(PY) scripts/vm --kernel-package $(KERNEL)
NATIVE := $(shell $(PY) scripts/native-dm >/dev/null 2>&1 && echo yes)

# Debian packages, each with one program (or file) that tells whether it is installed: what the
# tests need everywhere (dmsetup only as a test oracle; gcc and the UAPI headers for the struct
# layout test), and what the guest needs on top (udev: systemd-udevd for the udev tests)
TEST_APT := e2fsprogs:mkfs.ext4 xfsprogs:mkfs.xfs btrfs-progs:mkfs.btrfs dmsetup:dmsetup gcc:gcc \
	linux-libc-dev:/usr/include/linux/dm-ioctl.h
GUEST_APT := qemu-system-x86:qemu-system-x86_64 busybox-static:busybox cpio:cpio xz-utils:xz kmod:modprobe \
	udev:/lib/systemd/systemd-udevd
define apt_install
	@missing=""; for pair in $(1); do \
	    what=$${pair#*:}; \
	    case $$what in /*) test -e $$what ;; *) PATH="$$PATH:/usr/sbin:/sbin" command -v $$what >/dev/null 2>&1 ;; esac \
	        || missing="$$missing $${pair%%:*}"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "make deps: installing Debian packages:$$missing"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $$missing >/dev/null || exit 1; \
	fi
endef

# $(call timed,COMMAND,WHAT): run COMMAND, then say how long it took (CI prints these)
timed = @start=$$(date +%s); $(1); rc=$$?; echo "make: $(2): $$(( $$(date +%s) - start )) s"; exit $$rc

.PHONY: deps vm-deps test unit kernel vm-test test-kernels vm-shell demo bench clean

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
	$(call timed,$(PY) -m pytest tests/unit -q,unit suite ($(notdir $(PY))))

kernel:
ifeq ($(NATIVE),yes)
	$(call timed,$(PY) -m pytest tests/kernel -q,kernel suite (native $(shell uname -r)))
else
	$(call timed,$(VM) -- $(PY) -m pytest $(PYTEST_GUEST_OPTS) tests/kernel -q,kernel suite (guest $(KERNEL)))
endif

vm-test: deps vm-deps
	$(call timed,$(VM) -- $(PY) -m pytest $(PYTEST_GUEST_OPTS) tests/kernel -q,kernel suite (guest $(KERNEL)))

# every kernel of the matrix, one guest each; fails at the end when any of them failed
test-kernels: deps vm-deps
	@failed=""; for k in $(KERNELS); do \
	    echo "make: kernel suite on $$k"; start=$$(date +%s); \
	    $(PY) scripts/vm --kernel-package $$k -- $(PY) -m pytest $(PYTEST_GUEST_OPTS) tests/kernel -q \
	        || failed="$$failed $$k"; \
	    echo "make: kernel suite (guest $$k): $$(( $$(date +%s) - start )) s"; \
	done; \
	if [ -n "$$failed" ]; then echo "make: the kernel suite failed on:$$failed"; exit 1; fi

vm-shell: deps vm-deps
	$(VM)

demo: deps
ifeq ($(NATIVE),yes)
	$(PY) -m dmflakey_ioctl demo
else
	$(VM) -- $(PY) -m dmflakey_ioctl demo
endif

# the kernel parts run where device-mapper is (natively or in the guest); the import time and the
# log reader/replayer are measured on this host.  Every part runs; the target fails at the end
# when a part missed a target.
BENCH_GUEST_OUT := $(if $(NATIVE),.,/run/dmflakey-vm/out)
BENCH_KERNEL := $(if $(NATIVE),,$(VM) --memory 4096 --)
bench: deps
	@failed=""; \
	$(BENCH_KERNEL) $(PY) scripts/bench --out $(BENCH_GUEST_OUT)/bench.json || failed="$$failed bench"; \
	$(BENCH_KERNEL) $(PY) scripts/bench_explorer.py --out $(BENCH_GUEST_OUT)/bench-explorer.json \
	    || failed="$$failed bench_explorer"; \
	$(PY) scripts/bench --import-only --out bench.json || failed="$$failed import"; \
	$(PY) scripts/bench_writelog.py --out bench-writelog.json || failed="$$failed bench_writelog"; \
	if [ -n "$$failed" ]; then echo "make bench: targets missed in:$$failed"; exit 1; fi

clean:
	rm -rf build dist *.egg-info .pytest_cache
