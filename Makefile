# vadvisor: run it, test it, set up a real hypervisor for the tests.
#
#   make demo      run the agent on port 8181 against libvirt's test:///default
#   make test      set up the test bench (root) and run the whole test suite
#   make testbed   install and start libvirtd with QEMU/KVM (root, idempotent)
#   make bench     speed and memory, as ratios against baselines measured in the same run
#   make bench-overhead   its hypervisor overhead rows alone
#   make bench-page       the browser page's rows alone
#   make hostb / make hostb-stop   a second libvirt host on this machine, for migrations
#   make foreign / make foreign-stop   domains that are not the suite's (FOREIGN=20 running,
#                                      50 shut off), to run the suite as on a busy hypervisor
#   make demo-migration            the live-migration walkthrough, guided

PORT ?= 8181
# The first interpreter that has the libvirt binding (Debian's /usr/bin/python3
# has python3-libvirt; a python3 earlier on PATH may not).
PY = $(shell for p in /usr/bin/python3 python3; do $$p -c 'import libvirt' >/dev/null 2>&1 && { command -v $$p; exit; }; done; echo /usr/bin/python3)

DEMO_PACKAGES = python3-libvirt libvirt-clients
BENCH_PACKAGES = python3-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu nbdkit chromium iproute2 \
	$(if $(shell command -v npm),,nodejs npm) \
	libvirt-clients qemu-system-x86 qemu-utils prometheus curl rpm rpmlint rpm2cpio cpio python3-venv \
	systemd-container debootstrap

.PHONY: demo test testbed deps-demo deps-bench hostb hostb-stop demo-migration bench bench-overhead bench-page \
	foreign foreign-stop

demo: deps-demo
	@echo "vadvisor demo on http://localhost:$(PORT)/ (libvirt test:///default); Ctrl-C stops it"
	$(PY) vadvisor.py --connect test:///default --port $(PORT)

test: testbed
	$(PY) test_vadvisor.py

deps-demo:
	@$(call apt_install,$(DEMO_PACKAGES))

deps-bench:
	@$(call apt_install,$(BENCH_PACKAGES))

testbed: deps-bench
	@[ ! -e /dev/kvm ] || [ "$$(id -u)" != 0 ] || chmod 666 /dev/kvm
	@if ! virsh -c qemu:///system version >/dev/null 2>&1; then \
	  [ "$$(id -u)" = 0 ] || { echo "testbed: libvirtd is not running; run 'make testbed' as root"; exit 0; }; \
	  for i in $$(seq 150); do \
	    pgrep -x virtlogd >/dev/null || virtlogd -d; \
	    pgrep -x libvirtd >/dev/null || libvirtd -d; \
	    virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; \
	  done; \
	fi
	@virsh -c qemu:///system version --daemon 2>/dev/null | sed -n 's/^Running hypervisor: /testbed: /p' | grep . \
	  || echo "testbed: libvirtd does not answer at qemu:///system"

# Speed and memory against baselines measured in the same run (BENCH_GUESTS=40 real guests).
bench: testbed
	@$(call apt_install,prometheus-libvirt-exporter)
	@$(call apt_install_unstarted,netdata netdata-plugins-bash)
	$(PY) test_vadvisor.py --bench

# The hypervisor overhead rows alone (BENCH_GUESTS=120 fits this machine's memory).
bench-overhead: testbed
	@$(call apt_install,prometheus-libvirt-exporter)
	@$(call apt_install_unstarted,netdata netdata-plugins-bash)
	$(PY) test_vadvisor.py --bench-overhead

# The browser page's weight and update cost, at BENCH_GUESTS guests and at 1,000 domains.
bench-page: testbed
	$(PY) test_vadvisor.py --bench-page

hostb: testbed
	$(PY) test_vadvisor.py --hostb start

hostb-stop:
	$(PY) test_vadvisor.py --hostb stop

FOREIGN ?= 20
foreign: testbed
	$(PY) test_vadvisor.py --foreign start $(FOREIGN) 50

foreign-stop:
	$(PY) test_vadvisor.py --foreign stop

demo-migration: testbed
	$(PY) test_vadvisor.py --demo-migration

# Install Debian packages that are missing, when root; otherwise say what is missing.
define apt_install
missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
if [ -n "$$missing" ]; then \
  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
    echo "installing:" $$missing; \
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
  else echo "missing packages (install them as root):" $$missing; fi; \
fi
endef

# Packages whose service must not start when installed (the bench runs each peer
# alone, as it configures it): a policy-rc.d refuses every start meanwhile.
define apt_install_unstarted
placed=; if [ "$$(id -u)" = 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then \
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && placed=1; \
fi; \
$(call apt_install,$(1)); \
[ -z "$$placed" ] || rm -f /usr/sbin/policy-rc.d
endef

# -- packaging and installation ------------------------------------------------
#   make rpm                         noarch RPM into build/rpm/RPMS/noarch (offline)
#   make install [DESTDIR=] [PREFIX=/usr]   the same files without RPM
#   make uninstall                   removes them again (keeps the config file)
#   make rpmlint                     the RPM and its spec through rpmlint

RPM_DIR ?= $(CURDIR)/build/rpm
PREFIX ?= /usr
BINDIR ?= $(PREFIX)/bin
DOCDIR ?= $(PREFIX)/share/doc/vadvisor
MANDIR ?= $(PREFIX)/share/man
UNITDIR ?= $(if $(filter /usr,$(PREFIX)),/usr/lib/systemd/system,/etc/systemd/system)
CONFFILE ?= /etc/default/vadvisor

.PHONY: rpm rpmlint deps-rpm install uninstall

deps-rpm:
	@$(call apt_install,rpm rpmlint)

rpm: deps-rpm
	rm -rf "$(RPM_DIR)" && mkdir -p "$(RPM_DIR)/SOURCES"
	cp vadvisor.py vadvisor.service README.md LICENSE contrib/vadvisor.sysconfig contrib/vadvisor.1 \
	  "$(RPM_DIR)/SOURCES/"
	rpmbuild --quiet --define "_topdir $(RPM_DIR)" \
	  --define "vadvisor_version $$($(PY) vadvisor.py --version | cut -d' ' -f2)" -bb vadvisor.spec
	@ls "$(RPM_DIR)"/RPMS/noarch/*.rpm

install:
	install -D -m 0755 vadvisor.py "$(DESTDIR)$(BINDIR)/vadvisor"
	mkdir -p "$(DESTDIR)$(UNITDIR)"
	sed 's|/usr/bin/vadvisor|$(BINDIR)/vadvisor|' vadvisor.service > "$(DESTDIR)$(UNITDIR)/vadvisor.service"
	chmod 0644 "$(DESTDIR)$(UNITDIR)/vadvisor.service"
	[ -e "$(DESTDIR)$(CONFFILE)" ] || install -D -m 0644 contrib/vadvisor.sysconfig "$(DESTDIR)$(CONFFILE)"
	install -D -m 0644 README.md "$(DESTDIR)$(DOCDIR)/README.md"
	install -D -m 0644 LICENSE "$(DESTDIR)$(DOCDIR)/LICENSE"
	install -D -m 0644 contrib/vadvisor.1 "$(DESTDIR)$(MANDIR)/man1/vadvisor.1"
	@[ -n "$(DESTDIR)" ] || echo "installed; now: systemctl daemon-reload && systemctl enable --now vadvisor"

uninstall:
	rm -f "$(DESTDIR)$(BINDIR)/vadvisor" "$(DESTDIR)$(UNITDIR)/vadvisor.service"
	rm -f "$(DESTDIR)$(DOCDIR)/README.md" "$(DESTDIR)$(DOCDIR)/LICENSE" "$(DESTDIR)$(MANDIR)/man1/vadvisor.1"
	-rmdir "$(DESTDIR)$(DOCDIR)" 2>/dev/null
	@echo "kept $(DESTDIR)$(CONFFILE) (your options); remove it by hand if unwanted"

rpmlint: rpm
	rpmlint -c contrib/rpmlint.toml vadvisor.spec "$(RPM_DIR)"/RPMS/noarch/*.rpm
