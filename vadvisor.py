#!/usr/bin/python3
"""vadvisor: a read-only monitoring agent for KVM/libvirt hypervisors.

One file, the standard library and the libvirt binding.  Every second it reads
each domain's state from libvirt and its CPU, vCPU, memory and network counters
from the host kernel; everything else libvirt reads for each domain every
--full-interval.  It serves Prometheus metrics, a cAdvisor-like JSON API with a
minute of history, specs, events and a browser page (ROUTES lists them), and
optionally pushes StatsD.  libvirt is only ever opened read-only: the agent
never changes a domain.

The file reads the way data flows: constants; the libvirt connection; sampling
(the host-kernel tier, the libvirt tier, the spec reader, the per-domain store,
the sampler); the family registry; the formatters; the event hub; HTTP; systemd;
the command line; the browser page last.
"""

import argparse
import array
import base64
import collections
import datetime
import getpass
import hashlib
import heapq
import hmac
import json
import logging
import math
import os
import platform
import re
import resource
import signal
import socket
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
import zlib
from html import escape as html_escape
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qsl, urlsplit, unquote

try:
    from http.server import ThreadingHTTPServer  # novermin: the except branch serves 3.6
except ImportError:  # Python 3.6 has no ThreadingHTTPServer
    import socketserver; ThreadingHTTPServer = type("ThreadingHTTPServer", (socketserver.ThreadingMixIn, HTTPServer), {})

try:
    import libvirt
except ImportError:  # reported by main(); the formatters work without it
    libvirt = None


# =============================================================================
# Constants and small helpers
# =============================================================================

VERSION = "0.1.0"
log = logging.getLogger("vadvisor")

DEFAULT_GROUPS = ("state", "cpu_total", "balloon", "vcpu", "interface", "block")
OPTIONAL_GROUPS = ("perf", "iothread", "dirtyrate", "memory", "vm")
# The groups of the values the fast tier reads every --interval, for domains
# the host kernel cannot answer for; libvirt's state group alone otherwise.
FAST_GROUPS = ("state", "cpu_total", "vcpu", "balloon", "interface")
SOURCES = ("auto", "libvirt")

# virDomainState, in libvirt's enum order; the JSON API names states this way.
DOMAIN_STATES = ("NoState", "Running", "Blocked", "Paused", "Shutdown",
                 "Shutoff", "Crashed", "PMSuspended")
VCPU_STATES = ("Offline", "Running", "Blocked")
INACTIVE_STATES = (0, 5)    # nostate and shutoff: no QEMU process
PAUSED = 3
# virDomainPausedReason codes of a domain paused by a job of its own: migration,
# save, dump, snapshot (libvirt pauses it for them), and I/O error.
JOB_PAUSE_REASONS = (2, 3, 4, 9)
PAUSED_IOERROR = 5

# Domain jobs (virDomainJobType and virDomainJobOperation, libvirt's enum order).
JOB_TYPES = ("none", "bounded", "unbounded", "completed", "failed", "cancelled")
JOB_OPERATIONS = ("unknown", "start", "save", "restore", "migration-in", "migration-out",
                  "snapshot", "snapshot-revert", "dump", "backup", "snapshot-delete")
JOB_RUNNING = (1, 2)        # bounded, unbounded
JOB_RESULTS = dict((t, JOB_TYPES[t]) for t in (3, 4, 5))    # a job that ended: how
JOB_EVENT_WAIT = 3.0        # seconds a JobCompleted event may come after its job ended
# virDomainDiskErrorCode: what diskErrors() says of a disk.
DISK_ERRORS = ("none", "unspec", "no_space")

# Lifecycle event types and their detail reasons, in libvirt's enum order
# (libvirt 9.0).  Codes beyond these tables come from newer libvirt and are
# reported as "Unknown".
EVENT_TYPES = (
    ("Defined", ("Added", "Updated", "Renamed", "FromSnapshot")),
    ("Undefined", ("Removed", "Renamed")),
    ("Started", ("Booted", "Migrated", "Restored", "FromSnapshot", "Wakeup")),
    ("Suspended", ("Paused", "Migrated", "IOError", "Watchdog", "Restored",
                   "FromSnapshot", "APIError", "Postcopy", "PostcopyFailed")),
    ("Resumed", ("Unpaused", "Migrated", "FromSnapshot", "Postcopy",
                 "PostcopyFailed")),
    ("Stopped", ("Shutdown", "Destroyed", "Crashed", "Migrated", "Saved",
                 "Failed", "FromSnapshot")),
    ("Shutdown", ("Finished", "Guest", "Host")),
    ("PMSuspended", ("Memory", "Disk")),
    ("Crashed", ("Panicked", "Crashloaded")),
)
EVENT_TYPE_NAMES = tuple(name for name, _ in EVENT_TYPES)

# Every other domain event kind: (the binding's VIR_DOMAIN_EVENT_ID_ suffix,
# event_type, the names of the callback's arguments between the domain and the
# opaque value).  Argument values that are enum codes become names by
# EVENT_ENUMS; an unknown code stays a number.
DOMAIN_EVENTS = (
    ("REBOOT", "Reboot", ()),
    ("RTC_CHANGE", "RTCChange", ("utcoffset",)),
    ("WATCHDOG", "Watchdog", ("action",)),
    ("IO_ERROR_REASON", "IOError", ("path", "device", "action", "reason")),
    ("GRAPHICS", "Graphics", ("phase", "local", "remote", "auth_scheme", "subject")),
    ("CONTROL_ERROR", "ControlError", ()),
    ("BLOCK_JOB_2", "BlockJob", ("disk", "type", "status")),
    ("DISK_CHANGE", "DiskChange", ("old_source", "new_source", "device", "reason")),
    ("TRAY_CHANGE", "TrayChange", ("device", "reason")),
    ("PMWAKEUP", "PMWakeup", ("reason",)),
    ("PMSUSPEND", "PMSuspend", ("reason",)),
    ("BALLOON_CHANGE", "BalloonChange", ("actual",)),
    ("PMSUSPEND_DISK", "PMSuspendDisk", ("reason",)),
    ("DEVICE_REMOVED", "DeviceRemoved", ("device",)),
    ("TUNABLE", "Tunable", ("params",)),
    ("AGENT_LIFECYCLE", "AgentLifecycle", ("state", "reason")),
    ("DEVICE_ADDED", "DeviceAdded", ("device",)),
    ("MIGRATION_ITERATION", "MigrationIteration", ("iteration",)),
    ("JOB_COMPLETED", "JobCompleted", ("params",)),
    ("DEVICE_REMOVAL_FAILED", "DeviceRemovalFailed", ("device",)),
    ("METADATA_CHANGE", "MetadataChange", ("type", "nsuri")),
    ("BLOCK_THRESHOLD", "BlockThreshold", ("device", "path", "threshold", "excess")),
    ("MEMORY_FAILURE", "MemoryFailure", ("recipient", "action", "flags")),
    ("MEMORY_DEVICE_SIZE_CHANGE", "MemoryDeviceSizeChange", ("alias", "size")),
)
# Kinds libvirt delivers together with a newer kind for the same occurrence
# (IO_ERROR with IO_ERROR_REASON, BLOCK_JOB with BLOCK_JOB_2): registered, but
# recorded once, as the newer kind.
SUPERSEDED_EVENTS = ("IO_ERROR", "BLOCK_JOB")
# (event_type, argument) -> names of its codes, in libvirt's enum order.
EVENT_ENUMS = {
    ("Watchdog", "action"): ("none", "pause", "reset", "poweroff", "shutdown", "debug",
                             "inject-nmi"),
    ("IOError", "action"): ("none", "pause", "report"),
    ("Graphics", "phase"): ("connect", "initialize", "disconnect"),
    ("BlockJob", "type"): ("unknown", "pull", "copy", "commit", "active-commit", "backup"),
    ("BlockJob", "status"): ("completed", "failed", "canceled", "ready"),
    ("DiskChange", "reason"): ("missing-on-start", "drop-missing-on-start"),
    ("TrayChange", "reason"): ("open", "close"),
    ("AgentLifecycle", "state"): (None, "connected", "disconnected"),
    ("AgentLifecycle", "reason"): ("unknown", "domain-started", "channel"),
    ("MetadataChange", "type"): ("description", "title", "element"),
    ("MemoryFailure", "recipient"): ("hypervisor", "guest"),
    ("MemoryFailure", "action"): ("ignore", "inject", "fatal", "reset"),
    ("JobCompleted", "operation"): JOB_OPERATIONS,
    ("JobCompleted", "type"): JOB_TYPES,
}
# The detail argument that becomes the event's "reason" (lifecycle events have one too).
EVENT_REASONS = {"Watchdog": "action", "IOError": "reason", "BlockJob": "status",
                 "DiskChange": "reason", "TrayChange": "reason", "AgentLifecycle": "state",
                 "Graphics": "phase", "MemoryFailure": "action"}
ALL_EVENT_TYPES = EVENT_TYPE_NAMES + tuple(t for _, t, _ in DOMAIN_EVENTS)
# Events after which a domain's XML is read again (besides lifecycle events).
# (A finished block copy or commit, and a media change, change a disk's source.)
XML_CHANGE_EVENTS = ("MetadataChange", "DeviceAdded", "DeviceRemoved", "BlockJob", "DiskChange",
                     "TrayChange")


NUMBER_TYPES = (int, float, bool)
REST_FACTOR = 1             # rest at least this many times a sample's duration
LIVE_GATHER_SECONDS = 0.05      # live requests this close together share one libvirt call
STREAM_SEND_BUFFER = 65536      # bytes of kernel buffer per event stream
MAX_STUCK = 2                   # abandoned libvirt calls before no new one is started
# A StatsD push goes out in bursts: a receiver's socket holds some 90 datagrams by
# default (Linux, loopback) and a host with many domains pushes hundreds; a receiver
# not scheduled for a few milliseconds would silently lose the rest.
STATSD_BURST = 32               # datagrams ...
STATSD_BURST_GAP = 0.01         # ... then this many seconds' pause
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
                     r"[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")
CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def cached(cache, key, make, limit=20000):
    """cache[key], made by make() on a miss.  The caches are keyed by what
    libvirt reports (keys, domains), which is bounded in practice; a cache
    past limit is emptied so that it stays bounded whatever happens."""
    found = cache.get(key)
    if found is None:
        if len(cache) >= limit:
            cache.clear()
        found = cache[key] = make()
    return found


def codes(names, first=0):
    """'0 nostate, 1 running, ...': an enum table as help texts spell it."""
    return ", ".join("%d %s" % (code, names[code].lower()) for code in range(first, len(names)))


def enum_name(names, code):
    """The name for a libvirt enum code; 'Unknown' for codes we do not know."""
    if isinstance(code, int) and 0 <= code < len(names):
        return names[code]
    return "Unknown"


def event_names(event, detail):
    """(event_type, reason) for a lifecycle event's codes; never raises."""
    if isinstance(event, int) and 0 <= event < len(EVENT_TYPES):
        name, reasons = EVENT_TYPES[event]
        return name, enum_name(reasons, detail)
    return "Unknown", "Unknown"


def json_safe(value):
    """A callback argument as JSON can hold it: typed parameters, addresses and
    subjects are dicts and lists; anything else odd becomes its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return dict((str(k), json_safe(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return str(value)


def coded(event_type, name, value):
    """An event argument's code as its name by EVENT_ENUMS; other values as they are."""
    codes = EVENT_ENUMS.get((event_type, name))
    if codes is not None and type(value) is int and 0 <= value < len(codes) \
            and codes[value] is not None:
        return codes[value]
    return value


def event_details(event_type, names, args):
    """(reason, details) of a callback's arguments; an unexpected shape is kept
    whole under "arguments" and logged, never dropped."""
    if len(args) != len(names):
        log.warning("%s event with %d arguments, %d expected: recorded as they came",
                    event_type, len(args), len(names))
        return "", {"arguments": json_safe(list(args))}
    details = dict((name, json_safe(coded(event_type, name, value)))
                   for name, value in zip(names, args))
    if names == ("params",) and isinstance(details["params"], dict):
        # typed parameters: their own keys, whose codes are named as arguments' are
        details = dict((key, coded(event_type, key, value))
                       for key, value in details["params"].items())
    reason = details.get(EVENT_REASONS.get(event_type), "")
    return (reason if isinstance(reason, str) else str(reason)), details


def rfc3339(timestamp):
    """UTC time as RFC 3339 with milliseconds and a 'Z'."""
    return rfc3339_ms(int(timestamp * 1000))


def rfc3339_ms(millis):
    """The same from whole milliseconds, so equal milliseconds print equally."""
    seconds, millis = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % millis


def escape_controls(text):
    """Make control characters visible so a log line stays one line."""
    return CONTROL_CHARS_RE.sub(lambda m: "\\x%02x" % ord(m.group()), text)


def libvirt_version_string():
    if libvirt is None:
        return "none"
    return version_string(libvirt.getVersion())


def thread_cpu():
    """CPU seconds the calling thread has used (time.thread_time is 3.7+)."""
    return time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID)


def libvirt_constant(name):
    """A libvirt constant, or 0 where an older binding lacks it."""
    return getattr(libvirt, name, 0) if libvirt is not None else 0


# =============================================================================
# libvirt connection: read-only, reopened when it drops, event loop
# =============================================================================

def silence_libvirt():
    """Without an error handler libvirt prints every error to stderr itself."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def start_event_loop():
    """libvirt's default event loop in a daemon thread.

    Must run before the first connection is opened, or that connection never
    delivers events, keep-alives or close callbacks.
    """
    libvirt.virEventRegisterDefaultImpl()

    def run():
        while True:
            try:
                libvirt.virEventRunDefaultImpl()
            except Exception as exc:  # keep the loop alive whatever a callback did
                log.warning("libvirt event loop: %s", exc)
                time.sleep(0.1)

    thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
    thread.start()
    return thread


def describe(conn):
    """((label, value), ...) of the daemon's side for vadvisor_libvirt_info."""
    found = []
    for label, call, version in (("driver", conn.getType, False),
                                 ("libvirtd_version", conn.getLibVersion, True),
                                 ("hypervisor_version", conn.getVersion, True),
                                 ("hostname", conn.getHostname, False)):
        try:
            value = call()
            found.append((label, version_string(value) if version else value))
        except libvirt.libvirtError:
            found.append((label, ""))
    return tuple(found)


def version_string(number):
    return "%d.%d.%d" % (number // 1000000, number // 1000 % 1000, number % 1000)


def quietly(call, *args):
    """A libvirt call whose failure changes nothing (cleanup of a dead connection)."""
    try:
        call(*args)
    except libvirt.libvirtError:
        pass


class Hypervisor(object):
    """The agent's one read-only libvirt connection.

    The sampler opens, uses and drops it (each call through the LibvirtCaller);
    the spec reader reads domain XML over it.  The close callback (event-loop
    thread) only marks it broken; the sampler reopens it.
    """

    def __init__(self, uri, on_lifecycle=None, events=False):
        self.uri = uri
        self.on_lifecycle = on_lifecycle
        self.events = events
        self.conn = None
        self.callback_id = None
        self.broken = False
        self.error = "not connected yet"
        self.up = None          # unknown until the first attempt, so that one is logged
        self.on_event = None    # called with (name, uuid, event_type, reason, details)
        self.event_ids = []     # callback ids of the other event kinds
        self.info = ()          # ((label, value), ...) of the daemon, read at connection
        self.opened = 0         # connections opened so far
        self.opening = threading.Lock()

    def connection(self):
        """The open connection, opening it if needed; raises libvirtError.

        Opening (with its some 30 event registrations) can outlive
        --libvirt-timeout: the next round's call then waits for it on the
        lock and takes its connection, rather than opening a second one whose
        callbacks would record every event twice."""
        with self.opening:
            if self.conn is not None and self.broken:
                self.drop("connection closed by libvirt")
            if self.conn is None:
                self.broken = False
                conn = libvirt.openReadOnly(self.uri)
                self._watch(conn)
                self.info = describe(conn)
                self.conn = conn
                self.opened += 1
                self._set_state(True, None)
            return self.conn

    def _watch(self, conn):
        if not self.events:
            return
        try:
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError:
            pass  # local drivers such as test:/// have no keep-alive
        try:
            conn.registerCloseCallback(self._closed, None)
        except libvirt.libvirtError:
            pass
        if self.on_lifecycle is not None:
            self.callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None)
        if self.on_event is not None:
            kinds = [(kind, event_type, names) for kind, event_type, names in DOMAIN_EVENTS]
            kinds += [(kind, None, ()) for kind in SUPERSEDED_EVENTS]
            ids = []
            for kind, event_type, names in kinds:
                event_id = getattr(libvirt, "VIR_DOMAIN_EVENT_ID_" + kind, None)
                if event_id is None:
                    continue    # an older binding
                try:
                    ids.append(conn.domainEventRegisterAny(
                        None, event_id, self._callback(event_type, names), None))
                except libvirt.libvirtError as exc:
                    log.warning("cannot watch %s events: %s", kind, exc)
            self.event_ids = ids

    def _closed(self, _conn, _reason, _opaque):
        self.broken = True

    def _lifecycle(self, _conn, dom, event, detail, _opaque):
        # Runs on the event-loop thread: name() and UUIDString() are local,
        # so nothing here blocks on libvirtd.
        try:
            self.on_lifecycle(dom.name(), dom.UUIDString(), event, detail)
        except Exception as exc:
            log.warning("lifecycle event dropped: %s", exc)

    def _callback(self, event_type, names):
        """The callback of one event kind: its arguments between the domain and the
        opaque value become the event's details.  Runs on the event-loop thread
        and makes no call to libvirtd (name() and UUIDString() are local)."""
        def deliver(_conn, dom, *args):
            if event_type is None:
                return      # superseded: the newer kind records the same occurrence
            try:
                reason, details = event_details(event_type, names, args[:-1])
                self.on_event(dom.name(), dom.UUIDString(), event_type, reason, details)
            except Exception as exc:
                log.warning("%s event dropped: %s", event_type, exc)
        return deliver

    def answered(self):
        """A call succeeded: the connection is up, whatever it was before."""
        if self.up is not True and self.conn is not None:
            self._set_state(True, None)

    def not_answering(self, reason):
        self._set_state(False, "libvirt does not answer: " + reason)

    def drop(self, reason):
        conn, self.conn = self.conn, None
        if conn is not None:
            if self.callback_id is not None:
                quietly(conn.domainEventDeregisterAny, self.callback_id)
            for callback_id in self.event_ids:
                quietly(conn.domainEventDeregisterAny, callback_id)
            self.event_ids = []
            if self.events:
                quietly(conn.unregisterCloseCallback)
            quietly(conn.close)
            self.callback_id = None
        self._set_state(False, reason)

    def _set_state(self, up, error):
        if up != self.up:
            if up:
                log.info("connected to libvirt at %s (read-only)", self.uri)
            else:
                log.warning("libvirt at %s unreachable: %s; retrying", self.uri, error)
        self.up, self.error = up, error


class Stuck(Exception):
    """A libvirt call outlived --libvirt-timeout."""


class LibvirtCaller(object):
    """Every libvirt call that may wait on libvirtd or a guest goes through here:
    the sampler's, the spec reader's and the job watch's.

    A call runs in a worker thread and is waited for at most --libvirt-timeout.
    One that takes longer is left to finish on its own (libvirt calls cannot be
    cancelled) and counted as stuck; with MAX_STUCK of them still running no new
    call is started, so stuck calls never pile up.  While a caller waits, the
    heartbeat goes on (see wait)."""

    def __init__(self, timeout):
        self.timeout = timeout              # --libvirt-timeout
        self.stuck = 0                      # abandoned calls still running
        self.timeouts_total = 0
        self.last_answer = time.monotonic() # when a call last returned
        self.heartbeat = None               # called while waiting (the systemd watchdog) ...
        self.beating = None                 # ... by this thread alone: the sampling one
        self.lock = threading.Lock()

    def __call__(self, call, *args):
        """call(*args), or Stuck when it outlives --libvirt-timeout."""
        if self.stuck >= MAX_STUCK:
            raise Stuck("%d libvirt calls have not returned" % self.stuck)
        box = {}
        done = threading.Event()

        def work():
            try:
                box["result"] = call(*args)
            except BaseException as exc:
                box["error"] = exc
            with self.lock:
                self.last_answer = time.monotonic()
                if box.get("abandoned"):
                    self.stuck -= 1
                done.set()
        threading.Thread(target=work, name="libvirt-call", daemon=True).start()
        if not self.wait(done, self.timeout):
            with self.lock:
                if not done.is_set():
                    box["abandoned"] = True
                    self.stuck += 1
                    self.timeouts_total += 1
                    raise Stuck("a libvirt call (%s) took longer than %g s"
                                % (getattr(call, "__name__", "a call"), self.timeout))
        if "error" in box:
            raise box["error"]
        return box["result"]

    def responsive(self):
        """False while libvirt answers nothing at all (for the watchdog)."""
        return self.stuck == 0 or time.monotonic() - self.last_answer < 2 * self.timeout

    def wait(self, event, seconds):
        """event.wait(seconds), beating the heartbeat every 0.2 s meanwhile while libvirt
        is responsive (on the sampling thread: a spec read waiting does not beat).

        The beat goes on through the sampler's rests, while libvirt is down and while
        a call waits on a hung guest; it stops only once libvirt has answered nothing
        for twice --libvirt-timeout, which is what the systemd watchdog is for."""
        deadline = time.monotonic() + seconds
        beat = self.heartbeat if threading.current_thread() is self.beating else None
        while True:
            if beat is not None and self.responsive():
                beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return event.is_set()
            if event.wait(min(left, 0.2)):
                return True


# =============================================================================
# Sampling: the host-kernel tier, the libvirt tier, the spec reader, the store
# =============================================================================

TIERS = ("fast", "full")    # a sample's tier, TIERS[full]: the kernel's reads, or libvirt's every group

# -- the host-kernel tier --------------------------------------------------------
#
# libvirt itself reads a running QEMU domain's CPU, vCPU, RSS and tap counters
# from the host kernel.  Read here directly they cost microseconds and no
# monitor round trip, so they are read every --interval; everything else comes
# from libvirt's full sample every --full-interval.

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4
NS_PER_SECOND = 1000000000
VCPU_THREAD_RE = re.compile(rb"^CPU (\d+)/(?:KVM|TCG|HVF)$")
CGROUP_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")     # cgroup v2: hybrid, unified
CGROUP_V1_ROOTS = ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpuacct,cpu",
                   "/sys/fs/cgroup/cpuacct")
WAIT_PREFIXES = (b"se.statistics.wait_sum", b"se.wait_sum")   # what libvirt looks for


class KernelFile(object):
    """A /proc or /sys file kept open and re-read with pread: a fifth of the cost
    of opening it each time.  An open /proc/PID file stays bound to its
    process: once that exits, reads fail rather than read a reused pid."""

    __slots__ = ("fd",)

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def read(self, size=4096):
        """A file of one record (stat, schedstat, sched, cpu.stat): the kernel hands
        it out whole, however large the buffer has to be."""
        data = os.pread(self.fd, size, 0)
        while len(data) == size:
            size *= 4
            data = os.pread(self.fd, size, 0)
        return data

    def read_all(self):
        """A file of many records (/proc/net/dev, a line per interface): the kernel
        hands it out a page of records per read, so a read that comes back short
        is not its end (at some 33 interfaces one is).  Read on to the end."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        chunks = []
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def stat_fields(data):
    """/proc/PID/stat's fields after the command name (which may hold spaces):
    index 0 is field 3, state."""
    return data[data.rindex(b")") + 2:].split()


def ticks_ns(ticks):
    return ticks * NS_PER_SECOND // CLOCK_TICKS


def libvirt_cgroup(path):
    """True for a cgroup libvirt made for a domain: its emulator thread's group, or
    a machine group named after QEMU.  Any other (a session scope, libvirtd's own
    group when libvirt manages no cgroups) holds other processes too: libvirt then
    reads /proc/PID/stat, and so does the agent."""
    parts = path.rstrip("/").split("/")
    return parts[-1] == "emulator" or "qemu" in parts[-1]


def domain_cgroups(pid):
    """[(controllers, path)] of the cgroups libvirt put a QEMU process in, each the
    domain's own (its emulator thread's parent); raises OSError or ValueError."""
    with open("/proc/%d/cgroup" % pid) as f:
        lines = f.read().splitlines()
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if libvirt_cgroup(path):
            found.append((controllers, path[:-len("/emulator")] if path.endswith("/emulator")
                          else path))
    return found


class CgroupCpu(object):
    """A domain's CPU time from its cgroup, where libvirt reads it too."""

    def __init__(self, path, version):
        self.version = version
        if version == 2:
            self.stat = KernelFile(path + "/cpu.stat")
        else:
            self.usage = KernelFile(path + "/cpuacct.usage")
            try:
                self.stat = KernelFile(path + "/cpuacct.stat")
            except OSError:
                self.usage.close()
                raise

    def read(self):
        """(cpu.time, cpu.user, cpu.system) in ns."""
        fields = dict(line.split() for line in self.stat.read().splitlines() if b" " in line)
        if self.version == 2:
            return (int(fields[b"usage_usec"]) * 1000, int(fields[b"user_usec"]) * 1000,
                    int(fields[b"system_usec"]) * 1000)
        return (int(self.usage.read()), ticks_ns(int(fields[b"user"])),
                ticks_ns(int(fields[b"system"])))

    def close(self):
        for name in ("stat", "usage"):
            if hasattr(self, name):
                getattr(self, name).close()

    @classmethod
    def of(cls, pid):
        """The cgroup libvirt put the domain in (its emulator thread's parent), or None."""
        try:
            groups = domain_cgroups(pid)
        except (OSError, ValueError):
            return None
        for controllers, path in groups:    # cgroup v1's cpuacct first: where it is used,
            if "cpuacct" in controllers.split(","):     # libvirt reads it
                found = cls._open(CGROUP_V1_ROOTS, path, 1)
                if found:
                    return found
        for controllers, path in groups:
            if controllers == "":
                return cls._open(CGROUP_ROOTS, path, 2)
        return None

    @classmethod
    def _open(cls, roots, path, version):
        for root in roots:
            try:
                return cls(root + path, version)
            except OSError:
                continue
        return None


PRESSURES = ("cpu", "memory", "io")


class CgroupPressure(object):
    """How long a domain's tasks stalled waiting for a CPU, memory or I/O: the
    kernel's pressure stall information (PSI) of its cgroup, in cgroup v2 (unified,
    or the unified part of a hybrid host), as totals in microseconds: 'some' (at
    least one task waited) and 'full' (all of them did)."""

    def __init__(self, directory):
        self.files = []
        try:
            for kind in PRESSURES:
                self.files.append((kind, KernelFile("%s/%s.pressure" % (directory, kind))))
        except OSError:
            self.close()
            raise

    def read(self):
        """{pressure.<resource>.some|full: microseconds}."""
        found = {}
        for kind, kept in self.files:
            for line in kept.read().splitlines():
                share, _, fields = line.partition(b" ")
                found["pressure.%s.%s" % (kind, share.decode("ascii", "replace"))] = int(
                    fields.rpartition(b"total=")[2])
        return found

    def close(self):
        for _, kept in self.files:
            kept.close()

    @classmethod
    def of(cls, pid):
        """The pressure files of the cgroup libvirt put the domain in, or (None, why not)."""
        try:
            paths = [path for controllers, path in domain_cgroups(pid) if controllers == ""]
        except (OSError, ValueError):
            return None, "its /proc/PID/cgroup is not readable"
        if not paths:
            return None, "libvirt put the domain in no cgroup v2 group"
        for root in CGROUP_ROOTS:
            try:
                return cls(root + paths[0]), None
            except OSError as exc:
                why = "%s: %s" % (exc.filename or root + paths[0], exc.strerror or exc)
        return None, "no pressure file (a kernel without PSI, or booted with psi=0): " + why


class QemuProcess(object):
    """One running domain's QEMU process and the kernel files that describe it."""

    def __init__(self, pid, start):
        self.pid, self.start = pid, start
        self.stat = KernelFile("/proc/%d/stat" % pid)
        self.cgroup = CgroupCpu.of(pid)
        self.pressure, self.no_pressure = CgroupPressure.of(pid)    # None: why not
        self.vcpus = {}             # vCPU index -> (task stat, task schedstat, task sched or None)
        self.vcpus_scanned = None   # the vCPU indexes looked for last time

    def find_vcpus(self, wanted):
        """Map vCPU indexes to their threads, named 'CPU N/KVM' by QEMU."""
        self.vcpus_scanned = wanted
        task = "/proc/%d/task" % self.pid
        for tid in os.listdir(task):
            try:
                with open("%s/%s/comm" % (task, tid), "rb") as f:
                    match = VCPU_THREAD_RE.match(f.read().strip())
                index = int(match.group(1)) if match else None
                if index in wanted and index not in self.vcpus:
                    path = "%s/%s/" % (task, tid)
                    stat = KernelFile(path + "stat")
                    try:
                        self.vcpus[index] = (stat, KernelFile(path + "schedstat"),
                                             wait_file(path + "sched"))
                    except OSError:
                        stat.close()
                        raise
            except (OSError, ValueError):
                continue    # a thread that ended meanwhile

    def read(self, vcpus):
        """(the libvirt keys this process answers, in libvirt's units, whether every
        vCPU asked for was read).  Raises OSError once the process is gone, or
        LookupError if the pid was reused."""
        fields = stat_fields(self.stat.read())
        if int(fields[19]) != self.start:
            raise LookupError("pid %d now belongs to another process" % self.pid)
        utime, stime = int(fields[11]), int(fields[12])
        if self.cgroup is not None:
            cpu, user, system = self.cgroup.read()
        else:
            cpu, user, system = ticks_ns(utime + stime), ticks_ns(utime), ticks_ns(stime)
        stats = {"cpu.time": cpu, "cpu.user": user, "cpu.system": system,
                 "balloon.rss": int(fields[21]) * PAGE_KIB}
        if self.pressure is not None:
            stats.update(self.pressure.read())
        if set(vcpus) - set(self.vcpus) and vcpus != self.vcpus_scanned:
            self.find_vcpus(vcpus)
        every_vcpu = True
        for index in vcpus:
            files = self.vcpus.get(index)
            if files is None:
                every_vcpu = False      # no thread of that name: libvirt reads it
                continue
            try:
                task = stat_fields(files[0].read())
                delay = int(files[1].read().split()[1])
                wait = sched_wait(files[2].read(16384)) if files[2] else 0
            except (OSError, IndexError, ValueError):
                every_vcpu = False      # a vCPU unplugged meanwhile
                continue
            stats["vcpu.%d.time" % index] = ticks_ns(int(task[11]) + int(task[12]))
            stats["vcpu.%d.delay" % index] = delay
            stats["vcpu.%d.wait" % index] = wait
        return stats, every_vcpu

    def close(self):
        self.stat.close()
        for kept in (self.cgroup, self.pressure):
            if kept is not None:
                kept.close()
        for files in self.vcpus.values():
            for f in files:
                if f is not None:
                    f.close()


def sched_wait(data):
    """vcpu.N.wait as libvirt computes it: the wait_sum line of the thread's sched
    file (ms with a fraction) in ns.  Kernels since 5.16 name the line plain
    'wait_sum', which libvirt does not look for: it reports 0 there."""
    for line in data.splitlines():
        if line.startswith(WAIT_PREFIXES):
            return int(float(line.partition(b":")[2]) * 1000000)
    return 0


def wait_file(path):
    """The sched file kept open when it has a line libvirt reads; None when its
    value would always be 0 (a kernel without schedstats, or since 5.16)."""
    try:
        found = KernelFile(path)
        if any(line.startswith(WAIT_PREFIXES) for line in found.read(16384).splitlines()):
            return found
        found.close()
    except OSError:
        pass
    return None


def qemu_processes(uuids):
    """{uuid: [(pid, start time), ...]} of the processes whose command line
    has '-uuid <uuid>', for the uuids wanted; one pass over /proc."""
    wanted = dict((u.encode("ascii"), u) for u in uuids)
    found = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                args = f.read().split(b"\0")
            if b"-uuid" not in args:
                continue
            uuid = wanted.get(args[args.index(b"-uuid") + 1].lower())
            if uuid is None:
                continue
            with open("/proc/%s/stat" % entry, "rb") as f:
                start = int(stat_fields(f.read())[19])
            found[uuid].append((int(entry), start, b"\0".join(args)))
        except (OSError, IndexError, ValueError):
            continue    # a process that ended meanwhile, or hidden from us
    return found


def net_dev(data):
    """{interface: (rx bytes, packets, errs, drop, tx bytes, packets, errs, drop)}
    from /proc/net/dev, the file libvirt reads tap counters from."""
    counters = {}
    for line in data.splitlines()[2:]:
        name, _, numbers = line.partition(b":")
        fields = numbers.split()
        if len(fields) >= 12:
            counters[name.strip().decode("utf-8", "replace")] = (
                tuple(int(v) for v in fields[0:4]) + tuple(int(v) for v in fields[8:12]))
    return counters


def nic_views(spec):
    """{tap name: True when libvirt swaps its rx and tx} from a domain's spec.

    A tap is the host's end of the guest's NIC, so libvirt swaps its counters;
    a macvtap (type direct, or a network of macvtaps: its source has a mode)
    shares the guest's view and is not swapped.  vhost-user NICs are counted
    by Open vSwitch, not the kernel: they stay libvirt's."""
    views = {}
    for device in (spec or {}).get("devices", ()):
        if device.get("family") != "interface" or device.get("type") == "vhostuser":
            continue
        tap = (device.get("target") or {}).get("dev")
        if isinstance(tap, str):
            macvtap = device.get("type") == "direct" or "mode" in (device.get("source") or {})
            views[tap] = not macvtap
    return views


def local_qemu(conn, driver):
    """None when the connection's domains run as processes of this host's kernel
    (the QEMU driver, as describe() read it, over a local socket), else why not."""
    if driver != "QEMU":
        return "the %s driver runs no QEMU processes here" % (driver or "unknown")
    try:
        uri = conn.getURI()
    except libvirt.libvirtError as exc:
        return "libvirt does not say its URI (%s)" % exc
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    if parts.hostname or transport not in ("", "unix"):
        return "%s is a remote URI" % uri
    return None     # a /proc that cannot be read: KernelTier.attach finds out


class KernelTier(object):
    """The fast tier's host-kernel reads.  Each running QEMU domain's process is
    found once, by the '-uuid' argument in its command line, and its files are
    then kept open, in the domain's record.  A domain whose process cannot be
    found or read falls back to libvirt (logged once); it is looked for again
    after --full-interval, or at once after a lifecycle event."""

    def __init__(self, retry_seconds):
        self.retry = retry_seconds
        self.reason = "not connected yet"   # why the kernel is not read, or None
        self.conn = None        # the connection the reason is about
        self.net = None
        self.counters = None    # /proc/net/dev of this round

    def attach(self, conn, reason):
        """A new connection, and why its domains cannot be read from the kernel (None: they can)."""
        if reason is None and self.net is None:
            try:
                self.net = KernelFile("/proc/self/net/dev")
            except OSError as exc:
                reason = "/proc/self/net/dev: %s" % exc
        self.conn = conn
        if reason != self.reason:
            if reason:
                log.info("statistics come from libvirt only: %s", reason)
            else:
                log.info("CPU, vCPU, memory and network statistics come from the host kernel")
        self.reason = reason

    def begin(self, running):
        """A new round; running: [(DomainRecord, domain id)] of the active domains."""
        self.counters = None
        now = time.monotonic()
        missing = [(r, i) for r, i in running if r.process is None and r.look_again <= now]
        if missing:
            found = qemu_processes([r.uuid for r, _ in missing])
            news = []
            for record, dom_id in missing:
                why = self.match(record, dom_id, found.get(record.uuid, ()))
                record.why_libvirt = why
                if why:
                    record.look_again = now + self.retry
                    if not record.process_told:
                        record.process_told = True
                        news.append("%s: %s" % (record.uuid, why))
            if news:    # one line a round, however many domains (hidepid hides them all)
                log.warning("%d domain(s) read through libvirt, not the host kernel: %s%s",
                            len(news), news[0], " (and more)" if len(news) > 1 else "")

    def match(self, record, dom_id, candidates):
        """Keeps the domain's process in its record; returns why not, or None."""
        if len(candidates) > 1:     # a migration between two hosts on one machine
            mark = ("domain-%d-" % dom_id).encode()
            candidates = [c for c in candidates if mark in c[2]]
        if not candidates:
            return "no visible process has -uuid %s" % record.uuid
        if len(candidates) > 1:
            return "several processes have -uuid %s" % record.uuid
        pid, start, _ = candidates[0]
        try:
            record.process = QemuProcess(pid, start)
        except OSError as exc:
            return "process %d not readable: %s" % (pid, exc)
        record.look_again = 0.0
        record.process_told = False
        return None

    def read(self, record, shape, spec):
        """(the kernel's values for a running domain, {kind: why} of the FAST_KINDS it
        could not give): libvirt must read those.  shape: a record of the domain
        with its vCPU states and NIC names."""
        process = record.process
        if process is None:
            return {}, dict.fromkeys(KERNEL_KINDS, "its process is not found")
        vcpus = tuple(int(k.split(".")[1]) for k in shape
                      if k.startswith("vcpu.") and k.endswith(".state"))
        try:
            found, every_vcpu = process.read(vcpus)
        except (OSError, LookupError, IndexError, ValueError) as exc:
            self.forget(record)     # gone or reused: looked for again next round
            log.debug("domain %s: process %d not read: %s", record.uuid, process.pid, exc)
            return {}, dict.fromkeys(KERNEL_KINDS, "its process is gone")
        missing = {}
        if not every_vcpu:
            missing["vcpu"] = "a vCPU thread named 'CPU N/KVM' is not found"
        why = self.add_network(record, shape, spec, found)
        if why:
            missing["network"] = why
        self.tell(record, missing)
        record.why_libvirt = "its %s values: %s" % min(missing.items()) if missing else None
        return found, missing

    def add_network(self, record, shape, spec, found):
        """Adds the counters of the domain's taps to found; returns why a NIC's were
        not read, or None."""
        names = [(key[:-4], tap) for key, tap in shape.items()
                 if key.startswith("net.") and key.endswith(".name")]
        if not names:
            return None
        if spec is None:
            return SPEC_PENDING
        if record.views is None or record.views[0] is not spec:
            record.views = (spec, nic_views(spec))
        views = record.views[1]
        why = None
        for prefix, tap in names:
            if tap not in views:
                why = "NIC %s is no tap of the host kernel (its XML says)" % tap
                continue
            if self.counters is None:
                self.counters = net_dev(self.net.read_all())
            values = self.counters.get(tap)
            if values is None:
                why = "tap %s is not in /proc/self/net/dev" % tap
                continue
            if views[tap]:
                values = values[4:] + values[:4]
            for i, field in enumerate(NET_FIELDS):
                found[prefix + field] = values[i]
        return why

    @staticmethod
    def tell(record, missing):
        """Logs once per domain and kind a kind of value the kernel could not give (not
        while the domain's XML is still being read: a new domain's first rounds)."""
        for kind, why in sorted(missing.items()):
            if kind not in record.kinds_told and why is not SPEC_PENDING:
                record.kinds_told = record.kinds_told | {kind}
                log.warning("domain %s: its %s values are read through libvirt, not the host "
                            "kernel: %s", record.uuid, kind, why)

    @staticmethod
    def forget(record):
        """Closes the domain's process files (it is gone, or reused)."""
        record.close()

    def stopped(self, record):
        """The domain does not run: nothing of its process is kept, nothing was said."""
        self.forget(record)
        record.look_again, record.views, record.why_libvirt = 0.0, None, None
        record.process_told, record.kinds_told = False, frozenset()


NET_FIELDS = ("rx.bytes", "rx.pkts", "rx.errs", "rx.drop",
              "tx.bytes", "tx.pkts", "tx.errs", "tx.drop")
# The kinds of value the fast tier reads every --interval, and the libvirt group
# of each: a kind the kernel cannot give for a domain is read from that group.
FAST_KINDS = (("cpu", "cpu_total"), ("vcpu", "vcpu"), ("rss", "balloon"),
              ("network", "interface"))
KERNEL_KINDS = tuple(kind for kind, _ in FAST_KINDS)
SPEC_PENDING = "its XML is not read yet"


# -- the libvirt tier -------------------------------------------------------------

def stats_groups(collect):
    """The getAllDomainStats group mask for the default plus opt-in groups."""
    return group_mask(DEFAULT_GROUPS + tuple(collect), warn=True)


def group_mask(groups, warn=False):
    mask = 0
    for group in groups:
        value = libvirt_constant("VIR_DOMAIN_STATS_" + group.upper())
        if not value and warn:
            log.warning("stat group %r is not supported by this libvirt binding; skipped", group)
        mask |= value
    return mask


def is_paused(stats, reasons):
    """True for a paused domain whose pause reason is one of reasons."""
    return stats.get("state.state") == PAUSED and stats.get("state.reason") in reasons


def job_keys(job):
    """jobStats()'s numbers as the registry's job.* keys; the dirty rate, in pages
    per second, also in bytes."""
    keys = dict(("job." + k, v) for k, v in job.items() if type(v) in NUMBER_TYPES)
    pages = job.get("memory_dirty_rate")
    if type(pages) is int:
        keys["job.memory_dirty_rate_bytes"] = pages * job.get("memory_page_size", PAGE_KIB * 1024)
    return keys


def is_partial(last, stats):
    """True when stats lacks values the last complete record of the guest had,
    although the guest kept its state and its devices."""
    if stats.get("state.state") != last.get("state.state"):
        return False
    for key in ("vcpu.current", "net.count", "block.count"):
        if stats.get(key) != last.get(key):
            return False
    for key, value in last.items():
        if key.endswith(".name") and stats.get(key) != value:
            return False
    return True


def merge(now, libvirt, full_read, kernel=None, last_kernel=None, full=None, complete=None,
          disk_errors=None):
    """One domain's record of a round: each value from the first of its sources that
    has it, in this order:

      1. the host kernel now (kernel: the kinds of value it could give);
      2. libvirt now (libvirt): the state group and the kinds the kernel could not
         give, or, in a full read, every group;
      3. the kernel's last reading (last_kernel): a value it gave last time but not
         now (a vCPU thread or a tap gone since) stays that newer value;
      4. the newest full record (full: (record, when read)), in a fast round;
      5. the last complete full read (complete: (record, when, key count)), for a
         full read that NOWAIT answered in part: a guest whose job is held (a hung
         one) keeps its state and devices but loses its counters.

    A domain with no full record yet carries nothing, nor does one that stopped (it
    has no counters); one whose state changed since its full record wants a full
    read.  Disk errors (diskErrors()' keys) show only while the domain is paused by
    an I/O error.

    Returns (record, full, complete, wanted): the round's record with its
    vadvisor.stale and vadvisor.stats_age; what to keep as the newest full record
    and as the last complete one (None: what is kept stays); True when the domain
    wants a full read next round."""
    kept_full = kept_complete = None
    wanted = False
    if full_read:
        if complete is not None and len(libvirt) < complete[2] and is_partial(complete[0], libvirt):
            record = dict(complete[0])
            record.update(libvirt)
            record["vadvisor.stale"], record["vadvisor.stats_age"] = 1, now - complete[1]
        else:
            record = dict(libvirt, **{"vadvisor.stale": 0, "vadvisor.stats_age": 0})
            kept_complete = (record, now, len(libvirt))
        kept_full = (record, now)
        record = dict(record)       # the kept records stay libvirt's (the round adds to its own)
    else:
        base, read_at = full or (None, 0.0)
        state = libvirt.get("state.state")
        wanted = base is None or base.get("state.state") != state
        if base is None or wanted and state in INACTIVE_STATES:
            record = dict(libvirt, **{"vadvisor.stale": 0, "vadvisor.stats_age": 0})
        else:
            record = dict(base)
            record.update(last_kernel or ())
            record.update(libvirt)
            record["vadvisor.stats_age"] = base["vadvisor.stats_age"] + max(0.0, now - read_at)
    if kernel:
        record.update(kernel)
    if disk_errors and is_paused(record, (PAUSED_IOERROR,)):
        record.update(disk_errors)
    return record, kept_full, kept_complete, wanted


def guest_memory(stats, now):
    """What the round's record says of the guest's own memory figures: where they come
    from and why (guest: its balloon driver's statistics; host: none usable, so the
    QEMU process's RSS stands in), their age, and the memory used in the guest.

    Used in the guest is its total less what it can still use without swapping
    (balloon available - usable: MemTotal - MemAvailable, what `free` calls used),
    not available - unused: that counts the page cache the guest gives back on
    demand, and a guest with a warm cache would look full.  A guest kernel without
    'usable' (before Linux 4.x) gets available - unused - disk caches."""
    found = {}
    period, updated = stats.get("xml.balloon.period"), stats.get("balloon.last-update", 0)
    if updated:
        found["vadvisor.memory_stats_age"] = max(0.0, now - updated)
    read_at = now - stats.get("vadvisor.stats_age", 0)     # of the full record the figures are in
    if period is None:
        source, reason = "host", "no_balloon"
    elif not period:
        source, reason = "host", "no_period"
    elif not updated or "balloon.available" not in stats:
        source, reason = "host", "not_reported"
    elif read_at - updated > 3 * period:
        source, reason = "host", "stale"
    else:
        source, reason = "guest", "reported"
        free = stats.get("balloon.usable")
        if free is None:
            free = stats.get("balloon.unused", 0) + stats.get("balloon.disk_caches", 0)
        found["vadvisor.memory_used"] = max(0, stats["balloon.available"] - free)
    found["vadvisor.guest_memory.%s.%s" % (source, reason)] = 1
    return found


def balloon_period_set_since(stats, xml_read_at):
    """Whether the guest reported its memory after the XML, read then, said no period:
    one set live (virsh dommemstat --period) tells of itself by no event, so the XML is
    read again.  Once read, a period really unset again stops the reports, and this."""
    return stats.get("xml.balloon.period") == 0 and \
        stats.get("balloon.last-update", 0) > xml_read_at


class JobWatch(object):
    """The domains' running jobs (migration, save, dump, snapshot): jobStats() of
    each domain that has one, every fast round, and how each job ended.

    libvirt tells of no job's start, so the signs of one are used: a
    migration's iteration event (its first comes as it starts; a save is a
    migration to a file) and a pause for a migration, save, dump or snapshot
    (the fast tier sees the state every round).  A domain is read while
    jobStats() says a job runs: no call at all while no domain has a job.
    (A full read that comes back partial is no sign: a hung guest does that,
    and jobStats() would wait on it too.)  Runs on the sampler's thread; hints
    come from the event loop's, through the store.  A job's state is its
    domain's record's: job, idle_pause, ending.
    """

    def __init__(self, call, store):
        self.call = call                    # the LibvirtCaller
        self.store = store
        self.calls = {"jobStats": 0, "diskErrors": 0}
        self.on_end = None                  # (name, uuid, operation, result)

    def read(self, readings):
        """Adds the job.* keys of the domains with a job to their records of the round
        (readings: [(DomainRecord, virDomain, record)]); returns the calls' duration."""
        hints = self.store.take_hints()
        spent = 0.0
        for record, dom, stats in readings:
            paused = self.paused_for_job(record, stats)
            if not (record.job is not None or record.uuid in hints or paused):
                continue
            clock = time.monotonic()
            job = self.stats(dom.jobStats)
            spent += time.monotonic() - clock
            if job is None:             # no answer: ask again next round, decide nothing
                self.store.hint(record.uuid)
            elif job.get("type") in JOB_RUNNING:
                seen = record.job[1] if record.job is not None else time.time()
                record.job = (job, seen)
                stats.update(job_keys(job))
            else:
                if paused:
                    record.idle_pause = stats.get("state.reason")   # ask once
                if record.job is not None:
                    self.ended(record, dom)
        self.settle()
        return spent

    def paused_for_job(self, record, stats):
        """True for a domain paused by a job's kind of pause that was not found idle."""
        paused = is_paused(stats, JOB_PAUSE_REASONS)
        if not paused or record.idle_pause not in (None, stats.get("state.reason")):
            record.idle_pause = None
        return paused and record.idle_pause is None

    def ended(self, record, dom):
        """A job seen running has gone: how it ended is decided once its
        JobCompleted event had time to come (settle)."""
        running, seen = record.job
        record.job = None
        last = self.stats(dom.jobStats, libvirt_constant("VIR_DOMAIN_JOB_STATS_COMPLETED")) or {}
        operation = running.get("operation")
        result = JOB_RESULTS.get(last.get("type")) if last.get("operation") == operation else None
        self.end(record, operation, result, seen)

    @staticmethod
    def end(record, operation, result, seen):
        record.ending = record.ending + [(enum_name(JOB_OPERATIONS, operation), result, seen,
                                          time.monotonic())]

    def settle(self):
        """Counts the jobs that ended JOB_EVENT_WAIT ago, unless a JobCompleted event
        counted them: as libvirt's record of them says, and a migration with no
        record as failed (libvirt 9.0 keeps none of a cancelled one).  A job of
        which libvirt says nothing at all (a dump) is not counted."""
        now = time.monotonic()
        for record in self.store.with_ending():
            waiting = []
            for operation, result, seen, ended in record.ending:
                if now - ended < JOB_EVENT_WAIT:
                    waiting.append((operation, result, seen, ended))
                    continue
                if record.completed_at >= seen:
                    continue        # its JobCompleted event came
                if result is None and operation.startswith("migration"):
                    result = "failed"
                if result is not None and self.on_end is not None:
                    self.on_end(record.name, record.uuid, operation, result)
            record.ending = waiting

    def stats(self, call, *args):
        """A job-statistics call (jobStats, diskErrors): its reply, or None when the
        domain went, libvirt refused or did not answer (logged at debug: a domain
        may go any time)."""
        self.calls[call.__name__] += 1
        try:
            reply = self.call(call, *args)
        except (libvirt.libvirtError, Stuck) as exc:
            log.debug("%s: %s", call.__name__, exc)
            return None
        return reply if isinstance(reply, dict) else None

    def disk_errors(self, dom, stats):
        """block.N.error.<error> = 1 for each disk diskErrors() reports an error on,
        read only for a domain paused by an I/O error (at its full reads)."""
        found = {}
        targets = dict((stats.get("block.%d.name" % i), i)
                       for i in range(int(stats.get("block.count", 0))))
        for device, code in (self.stats(dom.diskErrors) or {}).items():
            if code and device in targets:
                error = DISK_ERRORS[code] if 0 < code < len(DISK_ERRORS) else str(code)
                found["block.%d.error.%s" % (targets[device], error)] = 1
        return found

    def departed(self, record):
        """The domain left libvirt's list: a job of it is ended (an outgoing
        migration's JobCompleted event says it completed)."""
        if record.job is not None:
            running, seen = record.job
            record.job = None
            self.end(record, running.get("operation"), None, seen)
        record.idle_pause = None


# -- the spec reader --------------------------------------------------------------

class SpecReader(object):
    """Domain specifications (the XML as JSON, see element_json) and their info
    labels (domain_info), read by a thread of their own through the libvirt caller.

    A domain's XML is read when it first appears in a sample and again after any
    event that may change it (its record's spec_stale); requests never read XML
    themselves.  Reading XML needs no guest, so a hung guest does not hold it up;
    a hung libvirtd makes the read a stuck call like any other."""

    def __init__(self, call, store, metadata_labels=(), inline=False):
        self.call, self.store, self.metadata_labels = call, store, metadata_labels
        self.inline = inline    # read in the caller's thread (--once)
        self.lock = threading.Lock()
        self.updated = threading.Condition(self.lock)
        self.seq = 0            # the sample the specs were last read for
        self.pending = None     # ({uuid: virDomain}, seq) for the thread
        self.working = False

    def request(self, domains, seq):
        """Read what a new sample needs, in the spec thread; never two at a time."""
        if self.inline:
            return self.read(domains, seq)
        with self.lock:
            if not self.working and not any(self.wanted(self.store.get(u)) for u in domains):
                self.seq = seq      # most rounds: no thread started for nothing to read
                self.updated.notify_all()
                return
            self.pending = (domains, seq)
            if self.working:
                return
            self.working = True
        threading.Thread(target=self._work, name="specs", daemon=True).start()

    @staticmethod
    def wanted(record):
        """True when the domain's spec is to be read: missing, or stale since an event."""
        return record is not None and (record.spec is None or record.spec_stale)

    def _work(self):
        while True:
            with self.lock:
                job, self.pending = self.pending, None
                if job is None:
                    self.working = False
                    return
            try:
                self.read(*job)
            except Exception as exc:  # keep specs flowing whatever one round met
                log.warning("spec refresh failed: %s", exc)

    def read(self, domains, seq):
        """Reads the XML of the domains (uuid -> virDomain) whose spec is missing or stale."""
        changed = False
        for uuid, dom in domains.items():
            record = self.store.get(uuid)
            if not self.wanted(record):
                continue
            record.spec_stale = False   # before the read: a change during it marks it again
            try:
                root = ElementTree.fromstring(self.call(dom.XMLDesc, 0))
            except (libvirt.libvirtError, Stuck) as exc:
                log.debug("spec of %s not read: %s", uuid, exc)
                record.spec_stale = True    # read again next round
                continue
            except ElementTree.ParseError as exc:
                log.warning("spec of %s is not valid XML: %s", uuid, exc)
                continue
            record.spec = element_json(root)
            record.xml, record.xml_read_at = domain_values(root), time.time()
            info = domain_info(root, self.metadata_labels)
            if info != record.info:
                record.info = info
                changed = True
        if changed:
            self.store.info_changed()
        with self.lock:
            self.seq = seq
            self.updated.notify_all()

    def get(self, key, seq=0, timeout=0):
        """The spec of a domain by uuid or name, once specs are as new as sample seq."""
        with self.lock:
            self.updated.wait_for(lambda: self.seq >= seq, timeout)
        record = self.store.find(key)
        return record.spec if record is not None else None

    def all(self):
        """The specs of the domains of the latest sample, by name."""
        specs = [r.spec for r in self.store.present_records() if r.spec is not None]
        return sorted(specs, key=lambda s: str(s.get("name", {}).get("value", "")))


# -- the per-domain store ----------------------------------------------------------

class DomainRecord(object):
    """Everything the agent keeps of one domain, in one place, whichever stage
    keeps it; DomainStore forgets it whole once the domain is gone."""

    __slots__ = (
        "uuid", "name", "seen", "gone_at",
        # the host-kernel tier: its QEMU process, when to look for it again, what
        # was logged, its NICs' kinds, the kernel's values of its latest sample
        "process", "look_again", "process_told", "kinds_told", "views", "kernel",
        # why some of its values were read through libvirt in the latest round
        "why_libvirt",
        # the libvirt tier: its newest full record, its last complete one, its next
        # full read, diskErrors()' keys of its I/O-error pause
        "full", "complete", "due", "disk_errors",
        # its job (jobStats() and when first seen), a pause found without one, jobs
        # that ended and wait for their JobCompleted event
        "job", "idle_pause", "ending",
        # the spec reader: the XML as JSON, its numbers (domain_values) and when they
        # were read, its info families, whether to read it again
        "spec", "xml", "xml_read_at", "info", "spec_stale",
        # events: counts {(family, labels): n}, the latest JobCompleted's details and
        # when it came, when the latest lifecycle event came
        "tallies", "last_job", "completed_at", "changed_at",
        # its samples of the last --history seconds (History)
        "ring",
    )

    def __init__(self, uuid, name):
        self.uuid, self.name = uuid, name
        self.seen = False           # in a sample yet
        self.gone_at = None         # when it left libvirt's list (Unix time)
        self.process = self.views = self.full = self.complete = self.job = None
        self.why_libvirt = None
        self.idle_pause = self.spec = self.info = self.last_job = self.changed_at = None
        self.ring = self.xml = None     # xml: None until the spec reader has read it
        self.look_again = self.due = self.completed_at = self.xml_read_at = 0.0
        self.process_told = self.spec_stale = False
        self.kinds_told = frozenset()
        self.kernel, self.disk_errors, self.tallies = {}, {}, {}
        self.ending = []

    def close(self):
        if self.process is not None:
            self.process.close()
            self.process = None

    def departed(self):
        """The domain left libvirt's list: what was of that life goes now (a domain back
        under the same uuid is a new QEMU, with new counters); what is counted of it,
        its history and its name stay until the record is forgotten."""
        self.close()
        self.full = self.complete = self.views = None
        self.kernel, self.disk_errors, self.xml = {}, {}, None
        self.due = self.look_again = 0.0
        self.process_told, self.kinds_told = False, frozenset()
        self.spec_stale = True


class DomainStore(object):
    """Every domain's record, and the one place a domain is forgotten: once it has
    been gone from libvirt's list for --down-minutes (and, while it has samples in
    the history, for --history, so that they stay in the JSON API as long as any
    other's), everything the agent kept of it goes.  Records are made by the sampler and by events (a domain
    defined and undefined between two samples is never in one, and goes the same
    way).  Fields one thread writes and others read are replaced whole, never
    changed in place."""

    def __init__(self, down_seconds=600, history_seconds=60):
        self.down_seconds = down_seconds
        self.keep_seconds = max(down_seconds, history_seconds)
        self.records = {}           # uuid -> DomainRecord
        self.lock = threading.Lock()
        self.info_version = 0       # moves when a domain's info labels change
        self.events_version = 0     # moves when a tally or a job's record does
        self.wanted = set()         # uuids an event wants read in full next round
        self.hints = set()          # uuids an event says may have a job

    def get(self, uuid):
        return self.records.get(uuid)

    def record(self, uuid, name):
        """The domain's record, made if it has none."""
        record = self.records.get(uuid)
        if record is None:
            with self.lock:
                record = self.make(uuid, name)
        return record

    def make(self, uuid, name):
        """The domain's record, made if it has none; with the lock held (what events
        write goes into a record eviction cannot take away meanwhile)."""
        record = self.records.get(uuid)
        if record is None:
            record = self.records[uuid] = DomainRecord(uuid, name)
        return record

    def present(self, domains, now):
        """The round's domains, [(uuid, name)]: their records, made or renamed; the
        others marked gone, and forgotten once gone long enough.  Returns (their
        records, the records that left since the last round)."""
        records = [self.record(uuid, name) for uuid, name in domains]
        here = set()
        for record, (_, name) in zip(records, domains):
            record.name, record.seen, record.gone_at = name, True, None
            here.add(record.uuid)
        left = []
        with self.lock:
            for record in list(self.records.values()):
                if record.uuid in here:
                    continue
                if record.gone_at is None:
                    record.gone_at = now
                    if record.seen:
                        record.departed()
                        left.append(record)
                elif record.job is not None or record.ending:
                    continue        # a job's end is still to be counted
                elif now - record.gone_at > (self.keep_seconds if record.ring else self.down_seconds):
                    del self.records[record.uuid]
                    record.close()
                    if record.tallies or record.last_job is not None:
                        self.events_version += 1
        return records, left

    def departed(self, now):
        """[(uuid, name)] of the domains that left within --down-minutes (vm_up 0)."""
        return sorted((r.uuid, r.name) for r in list(self.records.values())
                      if r.seen and r.gone_at is not None and now - r.gone_at <= self.down_seconds)

    def present_records(self):
        return [r for r in list(self.records.values()) if r.seen and r.gone_at is None]

    def find(self, key):
        """A present domain's record by uuid or name."""
        record = self.records.get(canonical_uuid(key) or key)
        if record is None:
            record = next((r for r in self.present_records() if r.name == key), None)
        return record if record is not None and record.gone_at is None else None

    def with_ending(self):
        return [r for r in list(self.records.values()) if r.ending]

    # -- what events ask of the next round -----------------------------------------
    def want_full(self, uuid):
        self.wanted.add(uuid)

    def take_wanted(self):
        wanted, self.wanted = self.wanted, set()
        return wanted

    def hint(self, uuid):
        self.hints.add(uuid)

    def take_hints(self):
        hints, self.hints = self.hints, set()
        return hints

    def mark_spec(self, uuid, name):
        with self.lock:
            self.make(uuid, name).spec_stale = True

    def info_changed(self):
        with self.lock:
            self.info_version += 1

    # -- what events leave -----------------------------------------------------------
    def count(self, uuid, name, series):
        """Adds one to the domain's tally of each (family, labels) of series."""
        with self.lock:
            record = self.make(uuid, name)
            tallies = dict(record.tallies)
            for key in series:
                tallies[key] = tallies.get(key, 0) + 1
            record.tallies = tallies
            self.events_version += 1

    def lifecycle(self, uuid, name, when):
        with self.lock:
            self.make(uuid, name).changed_at = when
            self.events_version += 1

    def job_completed(self, uuid, name, details, when):
        with self.lock:
            record = self.make(uuid, name)
            record.last_job, record.completed_at = details, when
            self.events_version += 1


# -- the sampler ----------------------------------------------------------------------

class Sample(object):
    """One round's result, never changed once published: [(uuid, name, {flat key:
    value})], every value in libvirt's keys and units whichever tier read it."""

    __slots__ = ("seq", "time", "duration", "domains", "gone", "full", "kernel_domains",
                 "through_libvirt", "host")

    def __init__(self, seq, when, duration, domains, gone=(), full=True, kernel_domains=0,
                 through_libvirt=None, host=None):
        self.seq = seq
        self.time = when
        self.duration = duration    # of the round's libvirt calls
        self.domains = domains
        self.gone = gone        # [(uuid, name)] of the domains that left within --down-minutes
        self.full = full        # True: libvirt read every group of every domain (a bulk call)
        self.kernel_domains = kernel_domains    # running domains whose fast values the kernel gave, all
        # {kind: running domains whose values of that kind (KERNEL_KINDS) libvirt read}
        self.through_libvirt = through_libvirt or {}
        self.host = host or {}  # the host beside its domains (Sampler.host_of)


class Reading(object):
    """One domain in one round: its record, what libvirt and the kernel gave."""

    __slots__ = ("record", "dom", "libvirt", "full_read", "kernel", "missing")

    def __init__(self, record, dom, libvirt, full_read):
        self.record, self.dom, self.libvirt, self.full_read = record, dom, libvirt, full_read
        self.kernel, self.missing = {}, {}

    def active(self):
        return self.libvirt.get("state.state") not in INACTIVE_STATES


class Sampler(object):
    """Takes one sample: libvirt's calls and the kernel's reads, merged per domain
    (merge) into one Sample.

    The fast tier, every --interval: libvirt's state group (no QEMU work) plus the
    host kernel's CPU, vCPU, RSS and tap counters of each running QEMU domain;
    the kinds of value the kernel cannot give for a domain are read through
    libvirt's groups of them.  The full tier: every group, for each domain every
    --full-interval (a few domains a round, see schedule), after its lifecycle,
    device or metadata event, and for live requests (one bulk call)."""

    def __init__(self, hypervisor, call, store, registry, groups, full_interval, rolling, source,
                 jobs, specs):
        self.hypervisor, self.call, self.store, self.registry = hypervisor, call, store, registry
        self.jobs, self.specs = jobs, specs
        self.groups = groups
        # The groups holding the fast tier's values, for domains read through libvirt.
        self.fast_mask = group_mask(FAST_GROUPS) & groups if groups else 0
        self.state_mask = group_mask(("state",))
        self.flags = libvirt_constant("VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT")
        self.full_interval = full_interval
        self.rolling = rolling              # the full tier rolls (see Pacer)
        self.kernel = KernelTier(full_interval) if source == "auto" else None
        self.keep_plans = {}                # a stats dict's keys -> the keys worth keeping
        self.calls_total = 0
        self.busy_seconds = 0.0             # time spent in libvirt's stats calls
        self.full_reads_total = 0           # domains read with every group
        self.host_read, self.host_due = {}, 0.0     # the host's CPUs and memory, when next

    def sample(self, seq, full=True):
        """Takes sample number seq (full: one bulk call of every group); raises
        libvirtError or Stuck."""
        conn = self.call(self.hypervisor.connection)
        kernel = self.kernel_ready(conn)
        groups = self.groups if full else (self.state_mask if kernel else self.fast_mask)
        listed, started, duration = self.stats_call(conn.getAllDomainStats, groups, self.flags)
        now = time.monotonic()
        records, left = self.store.present([(dom.UUIDString(), dom.name()) for dom, _ in listed],
                                           started)
        for record in left:
            self.jobs.departed(record)
        readings = [Reading(record, dom, self.kept(stats), full)
                    for record, (dom, stats) in zip(records, listed)]
        wanted = self.store.take_wanted()   # a bulk full read reads them anyway
        if not full:
            duration += self.read_in_full(conn, readings, wanted, now)
        self.schedule([r.record for r in readings if r.full_read], full, now)
        fallback = []
        if kernel:
            self.kernel.begin([(r.record, r.dom.ID()) for r in readings if r.active()])
            # The counters that move every second are the kernel's, read from here
            # on: the sample is of this moment, not of a full call's start.
            started = time.time()
            fallback = self.read_kernel(readings)
        if fallback:
            duration += self.read_fallback(conn, fallback)
        domains, from_kernel, through_libvirt = self.merge_all(readings, started, kernel)
        duration += self.jobs.read([(r.record, r.dom, stats) for r, (_, _, stats)
                                    in zip(readings, domains)])
        self.busy_seconds += duration
        self.hypervisor.answered()
        self.specs.request(dict((r.record.uuid, r.dom) for r in readings), seq)
        return Sample(seq, started, duration, domains, self.store.departed(started), full,
                      from_kernel, through_libvirt, self.host_of(conn, domains, now))

    def host_of(self, conn, domains, now):
        """The host beside its domains: its CPUs and memory (getInfo, getMemoryStats:
        local to libvirtd, no guest; read every --full-interval), what its active
        (running or paused) domains are given of them."""
        # Not while a call is stuck: queued behind it on the same connection, libvirt
        # 9.0's client left getMemoryStats unanswered (seen in about one of four
        # hung guests), and a second stuck call stops every call (MAX_STUCK).
        if now >= self.host_due and not self.call.stuck:
            self.host_due = now + self.full_interval
            try:
                info = self.call(conn.getInfo)
                memory = self.call(conn.getMemoryStats, libvirt_constant(
                    "VIR_NODE_MEMORY_STATS_ALL_CELLS") or -1, 0)
                self.host_read = {"cpus": info[2], "memory_bytes": memory["total"] * KIB,
                                  "memory_free_bytes": sum(memory.get(k, 0) for k in (
                                      "free", "buffers", "cached")) * KIB}
            except (libvirt.libvirtError, Stuck, KeyError, IndexError, TypeError) as exc:
                log.debug("the host's CPUs and memory not read: %s", exc)
        running = [stats for _, _, stats in domains
                   if stats.get("state.state") not in INACTIVE_STATES]
        return dict(self.host_read, running=len(running),
                    vcpus=sum(int(st.get("vcpu.current", 0)) for st in running),
                    memory_allocated_bytes=sum(int(st.get("balloon.current", 0))
                                               for st in running) * KIB)

    def kernel_ready(self, conn):
        """True when this connection's running domains are read from the host kernel."""
        if self.kernel is None:
            return False
        if conn is not self.kernel.conn:
            driver = dict(self.hypervisor.info).get("driver")
            self.kernel.attach(conn, self.call(local_qemu, conn, driver))
        return self.kernel.reason is None

    def read_in_full(self, conn, readings, wanted, now):
        """In a fast round, the domains whose full read is due, or that an event (or a
        change of state) asks to be read (wanted), in one domainListGetStats call;
        returns its duration."""
        due = [r for r in readings if r.record.uuid in wanted
               or self.rolling and r.record.due and r.record.due <= now]
        if not due:
            return 0.0
        extra, _, spent = self.stats_call(conn.domainListGetStats, [r.dom for r in due],
                                          self.groups, self.flags)
        fresh = dict((dom.UUIDString(), stats) for dom, stats in extra)
        for reading in due:
            stats = fresh.get(reading.record.uuid)
            if stats is not None:
                reading.libvirt, reading.full_read = self.kept(stats), True
        return spent

    def schedule(self, read, bulk, now):
        """The next full read of the domains just read in full, one --full-interval on.

        Domains new to the schedule (all of them at the first sample) are spread
        over one --full-interval, so that each fast round reads a few of them in
        one domainListGetStats call: libvirtd and QEMU get an even load, and no
        bulk call of every domain holds up the fast tier.  A bulk sample (a live
        request) leaves the others' turns where they are."""
        self.full_reads_total += len(read)
        new = [record for record in read if not record.due]
        for i, record in enumerate(new):
            record.due = now + self.full_interval * (i + 1) / len(new)
        if not bulk:
            for record in read:
                record.due = now + self.full_interval

    def read_kernel(self, readings):
        """The kernel's values of every running domain; returns the readings whose
        missing kinds libvirt must read (those not read in full this round)."""
        fallback = []
        for r in readings:
            if not r.active():
                self.kernel.stopped(r.record)
                r.record.kernel = {}
                continue
            r.kernel, r.missing = self.kernel.read(r.record, self.shape(r), r.record.spec)
            if r.missing and not r.full_read:
                fallback.append(r)
        return fallback

    @staticmethod
    def shape(reading):
        """A record of the domain with its vCPU states and NIC names, for the kernel:
        the newest full record in a fast round, the last complete one under a full
        read NOWAIT answered in part (see merge)."""
        record, libvirt = reading.record, reading.libvirt
        if not reading.full_read:
            return record.full[0] if record.full is not None else libvirt
        complete = record.complete
        if complete is not None and len(libvirt) < complete[2] and is_partial(complete[0], libvirt):
            return dict(complete[0], **libvirt)
        return libvirt

    def read_fallback(self, conn, fallback):
        """The kinds of value the kernel could not give, through libvirt: one call for
        the domains concerned, with the groups of those kinds; returns its duration."""
        kinds = set(kind for r in fallback for kind in r.missing)
        mask = self.state_mask | group_mask(g for kind, g in FAST_KINDS if kind in kinds)
        records, _, spent = self.stats_call(conn.domainListGetStats, [r.dom for r in fallback],
                                            mask & self.fast_mask, self.flags)
        readings = dict((r.record.uuid, r) for r in fallback)
        for dom, stats in records:
            reading = readings.get(dom.UUIDString())
            if reading is not None:
                reading.libvirt.update(self.kept(stats))
        return spent

    def merge_all(self, readings, now, kernel):
        """The round's records, by merge; the running domains the kernel gave every fast
        value of, and per kind of value how many libvirt read instead."""
        domains, from_kernel = [], 0
        through_libvirt = dict.fromkeys(KERNEL_KINDS, 0)
        for r in readings:
            record = r.record
            if not is_paused(r.libvirt, (PAUSED_IOERROR,)):
                record.disk_errors = {}
            elif r.full_read:   # read again at each full read while the pause lasts
                record.disk_errors = self.jobs.disk_errors(r.dom, r.libvirt)
            stats, full, complete, wanted = merge(now, r.libvirt, r.full_read, r.kernel,
                                                  record.kernel, record.full, record.complete,
                                                  record.disk_errors)
            record.full = full or record.full
            record.complete = complete or record.complete
            if wanted:
                self.store.want_full(record.uuid)
            if r.kernel:
                record.kernel = r.kernel
            if r.active() and record.xml is not None:
                stats.update(record.xml)
                stats.update(guest_memory(stats, now))
                if balloon_period_set_since(stats, record.xml_read_at):
                    self.store.mark_spec(record.uuid, record.name)
            if kernel and r.active():
                from_kernel += not r.missing
                for kind in r.missing:
                    through_libvirt[kind] += 1
            domains.append((record.uuid, record.name, stats))
        return domains, from_kernel, through_libvirt

    def stats_call(self, call, *args):
        """A libvirt stats call, tried again at once when it outlives --libvirt-timeout.

        A call stuck on a hung guest holds that guest's job; the second call's
        NOWAIT flag makes libvirt skip that guest and answer for the others.
        Returns (records, wall-clock start, duration) of the call that answered:
        the values are from its moment, and an abandoned call waits on a guest's
        monitor, not on libvirtd's CPU, so the pacing rule does not count it.
        """
        for attempt in (1, 2):
            self.calls_total += 1
            started, clock = time.time(), time.monotonic()
            try:
                records = self.call(call, *args)
                return records, started, time.monotonic() - clock
            except Stuck as exc:
                log.debug("%s (attempt %d)", exc, attempt)
                if attempt == 2:
                    raise

    def kept(self, stats):
        """The stats the agent uses: keys the registry maps, device names and
        counts.  The vcpu group alone brings some 37 KVM statistics per vCPU
        that only --collect vm exports; not keeping them halves a sample."""
        targets = self.registry.targets
        keep = cached(self.keep_plans, tuple(stats), lambda: tuple(
            k for k in stats if targets(k) or k.endswith((".name", ".count"))))
        return dict((k, stats[k]) for k in keep)


class Pacer(object):
    """When the next sample starts, per tier (the pacing rule).

    A sample starts --interval after the previous one started, a full one
    --full-interval after the previous full one, and never sooner than the
    previous call of the same tier took after it ended, so the agent keeps
    libvirtd busy at most half of the time however slow libvirt gets.  A live
    request can end the wait early, never that rest.  While libvirt is
    unreachable it retries after 1, 2, 4 ... 30 seconds."""

    def __init__(self, interval, full_interval):
        self.interval = interval
        self.full_interval = max(full_interval or interval, interval)
        # With --full-interval no longer than --interval every sample is a bulk full one;
        # otherwise the full tier rolls through the domains in the fast rounds.
        self.rolling = self.full_interval > interval
        self.last_full_began = None         # monotonic start of the latest bulk full sample
        self.full_not_before = 0.0          # the full tier's rest
        self.backoff = 0
        self.again = False                  # try again at once (see failed)

    def full_scheduled(self, when):
        """True when a bulk full sample is due at monotonic time when: the first one,
        and every one when the full tier does not roll (half an --interval early:
        samples start on --interval's beat)."""
        return (self.last_full_began is None
                or (not self.rolling
                    and when - self.last_full_began >= self.full_interval - self.interval / 2))

    def full_due(self, now, asked):
        """True when the sample starting now is a bulk full one (asked: a live request
        or a failure wants one)."""
        return (asked or self.full_scheduled(now)) and now >= self.full_not_before

    def taken(self, full, began, duration):
        """A sample was taken: the rest before the next fast one."""
        self.backoff = 0
        if not full:
            return REST_FACTOR * duration
        self.last_full_began = began
        self.full_not_before = time.monotonic() + REST_FACTOR * duration
        return 0.0

    def failed(self, connection_lost=False, reopened=False):
        """A sample failed: the rest before the next try.  A connection that worked
        and just broke (libvirtd restarted) is opened again at once; after that the
        rest doubles from 1 s to 30 s.  Opening one (reopened) ended an outage."""
        if reopened:
            self.backoff = 0
        if connection_lost and self.backoff == 0:   # once after a sample: then 1 s on
            self.backoff = 0.5
            self.again = True
            return 0.0
        self.backoff = min(30, max(1, self.backoff * 2))
        return self.backoff

    def next_start(self, began, ended, rest):
        if self.again:          # a broken connection: opened again at once
            self.again = False
            return ended
        next_at = max(began + self.interval, ended + rest)
        if self.full_scheduled(next_at):
            next_at = max(next_at, self.full_not_before)
        return next_at


class SampleLoop(object):
    """The sampling thread: takes a sample when the Pacer says so, publishes it (the
    history, the latest sample and the one before it) and wakes whoever waits for
    a fresh one.  One thread is the only code that calls libvirt's stats."""

    def __init__(self, sampler, pacer, history, hypervisor, call):
        self.sampler, self.pacer, self.history = sampler, pacer, history
        self.hypervisor, self.call = hypervisor, call
        self.latest = self.latest_full = Sample(0, 0.0, 0.0, [])
        self.previous = None                # the sample before latest (the overview's rates)
        self.samples_total = 0
        self.full_samples_total = 0
        self.durations = dict.fromkeys(TIERS, 0.0)      # of the latest sample of each tier
        self.cpu_seconds = dict.fromkeys(TIERS, 0.0)    # the sampler thread's, per tier
        self.errors_total = 0
        self.sampling = self.sampling_full = False
        self.live_wanted = self.full_wanted = False
        self.wakeup = threading.Event()
        self.new_sample = threading.Condition()
        self.stopping = threading.Event()

    def start(self):
        threading.Thread(target=self.run, name="sampler", daemon=True).start()

    def stop(self):
        self.stopping.set()
        self.wakeup.set()

    def run(self):
        self.call.beating = threading.current_thread()
        while not self.stopping.is_set():
            began = time.monotonic()
            rest = self.round(self.pacer.full_due(began, self.live_wanted or self.full_wanted))
            ended = time.monotonic()
            if self.call.wait(self.wakeup, self.pacer.next_start(began, ended, rest) - time.monotonic()):
                # Woken by a live request, which wants a full sample: keep the
                # rests, and gather the burst it may belong to so that the
                # burst shares one call.
                wait = max(ended + rest, self.pacer.full_not_before) - time.monotonic()
                self.call.wait(self.stopping, max(wait, LIVE_GATHER_SECONDS))
            self.wakeup.clear()

    def round(self, full):
        """One sample; returns the minimum rest before the next fast one."""
        began = time.monotonic()
        with self.new_sample:
            self.sampling, self.sampling_full = True, full
            if full:
                self.live_wanted = self.full_wanted = False
        cpu = thread_cpu()
        connected, opened = self.hypervisor.up is True, self.hypervisor.opened
        try:
            sample = self.sampler.sample(self.latest.seq + 1, full)
            self.cpu_seconds[TIERS[full]] += thread_cpu() - cpu
            self.publish(sample)
            return self.pacer.taken(full, began, sample.duration)
        except (libvirt.libvirtError, Stuck) as exc:
            self.errors_total += 1
            reopened = self.hypervisor.opened > opened
            lost = (connected or reopened) and not isinstance(exc, Stuck)
            if isinstance(exc, Stuck):
                # libvirt does not answer: keep the connection (closing it would
                # hang too) and let keep-alive or a late answer settle it.
                self.hypervisor.not_answering(str(exc))
            else:
                self.hypervisor.drop(str(exc))      # reopened on the next try
            self.full_wanted = True     # what was carried may be out of date
            return self.pacer.failed(lost, reopened)
        except Exception as exc:  # never let the sampler thread die
            log.warning("sample failed: %s", exc)
            log.debug("details", exc_info=True)
            return max(self.pacer.interval, 1)
        finally:
            with self.new_sample:
                self.sampling = False
                self.new_sample.notify_all()    # a failed round ends live waits too

    def once(self):
        """One bulk full sample, published (--once); raises libvirtError or Stuck."""
        sample = self.sampler.sample(1, True)
        self.publish(sample)
        return sample

    def publish(self, sample):
        self.history.add(sample)
        with self.new_sample:
            # the overview's rates span at least half an --interval: a live
            # request's sample right after a fast one does not make a new base
            if self.previous is None or sample.time - self.latest.time >= self.pacer.interval / 2:
                self.previous = self.latest
            self.latest = sample
            self.samples_total += 1
            self.durations[TIERS[sample.full]] = sample.duration
            if sample.full:
                self.latest_full = sample
                self.full_samples_total += 1
            self.new_sample.notify_all()

    def fresh_sample(self, timeout, started_after=False):
        """A full sample that completes after this call: concurrent callers share one.

        With started_after, one that also started after it (a sample already
        under way may predate what the caller looks for, a new domain).
        Returns None when libvirt is unreachable or no sample came in time.
        """
        # up is None while the first connection is being opened: a request
        # that comes in at start-up waits for it rather than failing.
        if self.hypervisor.up is False:
            return None
        with self.new_sample:
            under_way = self.sampling and self.sampling_full and not started_after
            wanted = self.latest.seq + (2 if self.sampling and not under_way else 1)
            if not under_way:
                self.live_wanted = True
                self.wakeup.set()
            self.new_sample.wait_for(
                lambda: self.latest_full.seq >= wanted or self.hypervisor.up is False, timeout)
            if self.latest_full.seq >= wanted:
                return self.latest_full
        return None


class Ring(object):
    """One domain's history in preallocated arrays, oldest record first.

    A record is a time, a layout (shared, see History) and a row of 64-bit
    floats.  Storing rows in one array per domain makes no Python object per
    record, so a minute of records never pins the small-object arenas that
    each second's libvirt dicts pass through; memory stays flat.
    """

    __slots__ = ("times", "layouts", "values", "width", "start", "count")

    def __init__(self, slots, width):
        self.times = array.array("d", bytes(8 * slots))
        self.layouts = [None] * slots
        self.values = array.array("d", bytes(8 * slots * width))
        self.width, self.start, self.count = width, 0, 0

    def append(self, when, layout, row):
        slots = len(self.layouts)
        if len(row) > self.width or self.count == slots:    # rare: grow, keep everything
            self.resize(max(len(row), self.width), slots * 2 if self.count == slots else slots)
            slots = len(self.layouts)
        i = (self.start + self.count) % slots
        self.times[i], self.layouts[i] = when, layout
        self.values[i * self.width:i * self.width + len(row)] = row
        self.count += 1

    def expire(self, horizon):
        while self.count and self.times[self.start] <= horizon:
            self.layouts[self.start] = None
            self.start = (self.start + 1) % len(self.layouts)
            self.count -= 1

    def records(self):
        """[(time, layout, values), ...], oldest first."""
        found = []
        for n in range(self.count):
            i = (self.start + n) % len(self.layouts)
            base = i * self.width
            layout = self.layouts[i]
            found.append((self.times[i], layout, self.values[base:base + len(layout[0])]))
        return found

    def resize(self, width, slots):
        old = self.records()
        Ring.__init__(self, slots, width)
        for record in old:
            self.append(*record)



class History(object):
    """The last --history seconds of samples per domain, stored compactly, in each
    domain's record (its ring).

    A domain's record is (time, layout, values): layout is a tuple of the
    numeric keys the JSON API shows plus the device names, shared between
    every record with the same keys; values are 64-bit floats in the
    domain's Ring (exact for integers below 2**53: 104 days of CPU time in
    nanoseconds, 8 PiB of bytes).  A minute of 1,000 domains costs tens of
    megabytes, not the hundreds a dict per record would.
    """

    def __init__(self, registry, store, seconds, interval=1.0):
        self.registry = registry
        self.store = store
        self.seconds = seconds
        self.slots = int(seconds / interval) + 2    # a ring grows if live requests add samples
        self.layouts = {}       # interning: equal layouts share one tuple
        self.plans = {}         # a stats dict's keys -> (numeric keys shown, name keys)
        self.templates = {}     # layout -> JsonTemplate
        self.lock = threading.Lock()

    def add(self, sample):
        horizon = sample.time - self.seconds
        rows = [(uuid, self.compact(stats)) for uuid, _name, stats in sample.domains]
        with self.lock:
            for record in list(self.store.records.values()):
                if record.ring is not None:
                    record.ring.expire(horizon)
                    if not record.ring.count:
                        record.ring = None
            for uuid, (layout, values) in rows:
                record = self.store.get(uuid)
                if record is None:
                    continue        # forgotten meanwhile
                if record.ring is None:
                    record.ring = Ring(self.slots, len(values))
                record.ring.append(sample.time, layout, values)

    def compact(self, stats):
        """(layout, values) for a stats dict: what a history record holds."""
        shape = tuple(stats)    # libvirt gives a domain the same keys each time
        keys, name_keys = cached(self.plans, shape, lambda: self._plan(stats))
        try:
            packed = array.array("d", [stats[k] for k in keys])
        except (TypeError, OverflowError):  # a value stopped being a number: plan afresh
            del self.plans[shape]
            return self.compact(stats)
        layout = (keys, tuple([(k, stats[k]) for k in name_keys]))
        layout = self.layouts.setdefault(layout, layout)
        return layout, packed

    def _plan(self, stats):
        if len(self.layouts) > 20000:   # bounded however domains come and go
            self.layouts.clear()
        shown = self.registry.json_key
        keys = tuple(k for k, v in stats.items() if type(v) in NUMBER_TYPES and shown(k))
        names = tuple(k for k, v in stats.items() if type(v) is str and k.endswith(".name"))
        return keys, names

    def render(self, when, layout, values):
        """A record as the JSON text of one sample."""
        template = cached(self.templates, layout, lambda: JsonTemplate(self.registry, layout))
        return template.render(when, values)

    def get(self, uuid=None):
        """{uuid: [(time, layout, values), ...]}, oldest first."""
        with self.lock:
            if uuid is None:
                return dict((r.uuid, r.ring.records()) for r in list(self.store.records.values())
                            if r.ring is not None)
            record = self.store.get(uuid)
            return {uuid: record.ring.records()} if record is not None and record.ring else {}


# =============================================================================
# The family registry: every family the agent exports, declared once
# =============================================================================
#
# A family is declared by its source, and every format derives from that one
# declaration: /metrics and --once (one renderer), StatsD, the JSON API and its
# history, the overview.  Sources:
#   Row       a libvirt key of the sampled records (every tier gives libvirt's
#             keys): /metrics, StatsD, and the JSON API where it has a place;
#   Info      a domain's XML, as the spec reader read it: labels, value 1;
#   Recorded  a value the domain's record keeps (when its state last changed);
#   Tally     a count of the domain's events;
#   LastJob   a field of the domain's latest JobCompleted event;
#   Own       the agent's own statistics.
# Per-domain families are shown for the domains of the latest sample; those
# marked departed also for the domains that left within --down-minutes.
#
# A Row: libvirt field pattern, Prometheus name, type, scale from libvirt's unit
# to the base unit, labels beyond uuid and name, JSON place (with the scale from
# libvirt's unit to the JSON unit), help text.  Patterns: <cpu>, <interface>,
# <device>, <iothread>, <monitor> and <node> stand for an index and become a
# label (interface, device and monitor take the device's name, see
# NAMED_DEVICES); <stat> stands for a statistic's own name and is carried into
# the Prometheus name, so one row maps a whole opt-in group.  JSON places: "a.b"
# is a key in the sample; "list[].key" is a key of one device's entry in a list.
# Units in JSON follow the original vAdvisor: CPU times in ms, memory in KiB,
# disk times in ns, everything else as libvirt; a tuple of names instead of a
# JSON scale turns a code into its name.

COUNTER, GAUGE = "counter", "gauge"
NS = 1e-9           # nanoseconds -> seconds
KIB = 1024          # KiB -> bytes
MIB = 1048576       # MiB -> bytes
MS = 1e-6           # nanoseconds -> milliseconds (JSON)


def up_value(state):
    """vm_up of a libvirt state: 1 while running, else 0 (paused too)."""
    return 1 if state == 1 else 0


class Row(object):
    """A sampled family: value (a function of libvirt's value, instead of the
    scale) and departed (the value a vanished domain keeps showing) are vm_up's."""

    __slots__ = ("field", "name", "type", "scale", "labels", "json", "json_scale",
                 "help", "requires", "regex", "value", "departed")

    def __init__(self, field, name, mtype, scale, labels, json_place, help_text,
                 json_scale=1, requires=None, value=None, departed=None):
        self.field, self.name, self.type, self.scale = field, name, mtype, scale
        self.labels, self.json, self.json_scale = labels, json_place, json_scale
        self.help, self.requires = help_text, requires
        self.value, self.departed = value, departed
        self.regex = compile_field(field)


# Placeholders that stand for a word, not an index: <stat> goes into the name,
# <error> becomes its label's value as it is.
WORD_PLACEHOLDERS = ("stat", "error", "source", "reason")


def compile_field(field):
    """'net.<interface>.rx.bytes' -> a regex with a named group per placeholder."""
    parts = re.split(r"<(\w+)>", field)
    for i in range(1, len(parts), 2):
        word = parts[i]
        parts[i] = ("(?P<%s>[A-Za-z0-9_-]+)" if word in WORD_PLACEHOLDERS
                    else "(?P<%s>[0-9]+)") % word
    for i in range(0, len(parts), 2):
        parts[i] = re.escape(parts[i])
    return re.compile("^" + "".join(parts) + "$")


ROWS = (
    # -- domain state -------------------------------------------------------
    Row("state.state", "vm_up", GAUGE, 1, (), None,
        "1 when the domain is running, else 0; stays 0 for --down-minutes after the domain vanishes.",
        value=up_value, departed=0),
    Row("state.state", "vm_state", GAUGE, 1, (), "state",
        "libvirt domain state: %s." % codes(DOMAIN_STATES), DOMAIN_STATES),
    Row("state.reason", "vm_state_reason", GAUGE, 1, (), "state_reason",
        "libvirt's reason code for the current domain state."),
    # Set by the sampler, not libvirt: see merge.
    Row("vadvisor.stale", "vm_stats_stale", GAUGE, 1, (), "stale",
        "1 while libvirt cannot read the domain's statistics (a hung guest) and the last ones are shown."),
    Row("vadvisor.stats_age", "vm_stats_age_seconds", GAUGE, 1, (), "stats_age",
        "Age of the domain's full-tier statistics (disks, balloon, vCPU states) when the sample "
        "was taken: 0 in a full sample, up to --full-interval in between, growing while stale."),
    # -- CPU -----------------------------------------------------------------
    Row("cpu.time", "vm_cpu_seconds_total", COUNTER, NS, (), "cpu.usage.cpu_time",
        "CPU time used by the domain (guest and emulator), in seconds.", MS),
    Row("cpu.user", "vm_cpu_user_seconds_total", COUNTER, NS, (), "cpu.usage.user_time",
        "User-mode CPU time used by the domain's host process, in seconds.", MS),
    Row("cpu.system", "vm_cpu_system_seconds_total", COUNTER, NS, (), "cpu.usage.system_time",
        "Kernel-mode CPU time used by the domain's host process, in seconds.", MS),
    Row("cpu.haltpoll.success.time", "vm_cpu_haltpoll_success_seconds_total", COUNTER, NS, (),
        "cpu.haltpoll.success_time", "CPU time spent in successful halt polling, in seconds.", MS),
    Row("cpu.haltpoll.fail.time", "vm_cpu_haltpoll_fail_seconds_total", COUNTER, NS, (),
        "cpu.haltpoll.fail_time", "CPU time spent in failed halt polling, in seconds.", MS),
    Row("vcpu.current", "vm_vcpus", GAUGE, 1, (), "cpu.vcpus", "Number of online vCPUs."),
    Row("vcpu.maximum", "vm_vcpus_maximum", GAUGE, 1, (), "cpu.vcpus_maximum",
        "Maximum number of vCPUs."),
    Row("vcpu.<cpu>.state", "vm_vcpu_state", GAUGE, 1, ("cpu",), "cpu.per_cpu_usage[].state",
        "vCPU state: %s." % codes(VCPU_STATES), VCPU_STATES),
    Row("vcpu.<cpu>.time", "vm_vcpu_seconds_total", COUNTER, NS, ("cpu",),
        "cpu.per_cpu_usage[].vcpu_time", "Time the vCPU ran, in seconds.", MS),
    Row("vcpu.<cpu>.wait", "vm_vcpu_wait_seconds_total", COUNTER, NS, ("cpu",),
        "cpu.per_cpu_usage[].wait_time", "Time the vCPU waited on I/O, in seconds.", MS),
    Row("vcpu.<cpu>.delay", "vm_vcpu_delay_seconds_total", COUNTER, NS, ("cpu",),
        "cpu.per_cpu_usage[].delay_time",
        "Time the vCPU was runnable but waited for a host CPU (steal time), in seconds.", MS),
    Row("vcpu.<cpu>.halted", "vm_vcpu_halted", GAUGE, 1, ("cpu",), "cpu.per_cpu_usage[].halted",
        "1 when the vCPU is halted."),
    # -- pressure: the host kernel's stall times (PSI) of the domain's cgroup -----
    Row("pressure.cpu.some", "vm_pressure_cpu_waiting_seconds_total", COUNTER, 1e-6, (),
        "pressure.cpu.waiting", "Time at least one of the domain's tasks was runnable but "
        "waited for a host CPU (PSI 'some' of its cgroup), in seconds.", 1e-3),
    Row("pressure.cpu.full", "vm_pressure_cpu_stalled_seconds_total", COUNTER, 1e-6, (),
        "pressure.cpu.stalled", "Time all of the domain's runnable tasks waited for a host CPU "
        "at once (PSI 'full'), in seconds.", 1e-3),
    Row("pressure.memory.some", "vm_pressure_memory_waiting_seconds_total", COUNTER, 1e-6, (),
        "pressure.memory.waiting", "Time at least one of the domain's tasks waited for memory "
        "(reclaim, swap-in, refaults: PSI 'some'), in seconds.", 1e-3),
    Row("pressure.memory.full", "vm_pressure_memory_stalled_seconds_total", COUNTER, 1e-6, (),
        "pressure.memory.stalled", "Time all of the domain's tasks waited for memory at once "
        "(thrashing: PSI 'full'), in seconds.", 1e-3),
    Row("pressure.io.some", "vm_pressure_io_waiting_seconds_total", COUNTER, 1e-6, (),
        "pressure.io.waiting", "Time at least one of the domain's tasks waited for I/O "
        "(PSI 'some'), in seconds.", 1e-3),
    Row("pressure.io.full", "vm_pressure_io_stalled_seconds_total", COUNTER, 1e-6, (),
        "pressure.io.stalled", "Time all of the domain's tasks waited for I/O at once "
        "(PSI 'full'), in seconds.", 1e-3),
    # -- memory (balloon) ----------------------------------------------------
    Row("balloon.current", "vm_memory_bytes", GAUGE, KIB, (), "memory.actual",
        "Memory currently assigned to the domain (balloon size), in bytes."),
    Row("balloon.maximum", "vm_memory_maximum_bytes", GAUGE, KIB, (), "memory.maximum",
        "Maximum memory the domain may use, in bytes."),
    Row("balloon.rss", "vm_memory_rss_bytes", GAUGE, KIB, (), "memory.rss",
        "Resident set size of the domain's host process, in bytes."),
    Row("balloon.usable", "vm_memory_usable_bytes", GAUGE, KIB, (), "memory.usable",
        "Memory the guest can use without swapping (guest balloon driver), in bytes."),
    Row("balloon.available", "vm_memory_available_bytes", GAUGE, KIB, (), "memory.available",
        "Memory the guest sees as available (guest balloon driver), in bytes."),
    Row("balloon.unused", "vm_memory_unused_bytes", GAUGE, KIB, (), "memory.unused",
        "Memory left unused by the guest (guest balloon driver), in bytes."),
    Row("balloon.disk_caches", "vm_memory_disk_caches_bytes", GAUGE, KIB, (), "memory.disk_caches",
        "Guest memory used for disk caches (guest balloon driver), in bytes."),
    Row("balloon.swap_in", "vm_memory_swap_in_bytes_total", COUNTER, KIB, (), "memory.swap_in",
        "Memory the guest swapped in (guest balloon driver), in bytes."),
    Row("balloon.swap_out", "vm_memory_swap_out_bytes_total", COUNTER, KIB, (), "memory.swap_out",
        "Memory the guest swapped out (guest balloon driver), in bytes."),
    Row("balloon.major_fault", "vm_memory_major_faults_total", COUNTER, 1, (), "memory.major_fault",
        "Guest page faults that needed disk I/O (guest balloon driver)."),
    Row("balloon.minor_fault", "vm_memory_minor_faults_total", COUNTER, 1, (), "memory.minor_fault",
        "Guest page faults served from memory (guest balloon driver)."),
    Row("balloon.hugetlb_pgalloc", "vm_memory_hugetlb_allocations_total", COUNTER, 1, (),
        "memory.hugetlb_pgalloc", "Successful huge page allocations in the guest."),
    Row("balloon.hugetlb_pgfail", "vm_memory_hugetlb_failures_total", COUNTER, 1, (),
        "memory.hugetlb_pgfail", "Failed huge page allocations in the guest."),
    Row("balloon.last-update", "vm_memory_stats_updated_timestamp_seconds", GAUGE, 1, (),
        "memory.last_update", "When the guest last updated its balloon statistics, Unix time."),
    # From the domain's XML and the sampler (guest_memory), not libvirt's statistics.
    Row("xml.balloon.period", "vm_memory_stats_period_seconds", GAUGE, 1, (), "memory.stats_period",
        "How often the guest's balloon driver reports its memory (<memballoon><stats period>); "
        "0 where none is set: no in-guest figures then."),
    Row("vadvisor.memory_stats_age", "vm_memory_stats_age_seconds", GAUGE, 1, (),
        "memory.stats_age", "Age of the guest's latest balloon statistics when the sample was taken."),
    Row("vadvisor.memory_used", "vm_memory_used_bytes", GAUGE, KIB, (), "memory.used",
        "Memory used in the guest by its own count: total less what it can use without swapping "
        "(MemTotal - MemAvailable), in bytes; where its statistics are usable."),
    Row("vadvisor.guest_memory.<source>.<reason>", "vm_memory_guest_info", GAUGE, 1,
        ("source", "reason"), None,
        "Where the domain's memory figures come from (value 1): source guest, reason reported "
        "(its balloon driver's statistics); or source host (the QEMU process's RSS stands in), "
        "reason no_balloon, no_period, not_reported or stale (older than three periods)."),
    # -- network -------------------------------------------------------------
    Row("net.<interface>.rx.bytes", "vm_network_receive_bytes_total", COUNTER, 1, ("interface",),
        "network.interfaces[].rx_bytes", "Bytes received by the interface."),
    Row("net.<interface>.rx.pkts", "vm_network_receive_packets_total", COUNTER, 1, ("interface",),
        "network.interfaces[].rx_packets", "Packets received by the interface."),
    Row("net.<interface>.rx.errs", "vm_network_receive_errors_total", COUNTER, 1, ("interface",),
        "network.interfaces[].rx_errors", "Receive errors on the interface."),
    Row("net.<interface>.rx.drop", "vm_network_receive_dropped_packets_total", COUNTER, 1,
        ("interface",), "network.interfaces[].rx_dropped", "Received packets dropped on the interface."),
    Row("net.<interface>.tx.bytes", "vm_network_transmit_bytes_total", COUNTER, 1, ("interface",),
        "network.interfaces[].tx_bytes", "Bytes transmitted by the interface."),
    Row("net.<interface>.tx.pkts", "vm_network_transmit_packets_total", COUNTER, 1, ("interface",),
        "network.interfaces[].tx_packets", "Packets transmitted by the interface."),
    Row("net.<interface>.tx.errs", "vm_network_transmit_errors_total", COUNTER, 1, ("interface",),
        "network.interfaces[].tx_errors", "Transmit errors on the interface."),
    Row("net.<interface>.tx.drop", "vm_network_transmit_dropped_packets_total", COUNTER, 1,
        ("interface",), "network.interfaces[].tx_dropped",
        "Transmitted packets dropped on the interface."),
    # -- block devices ---------------------------------------------------------
    Row("block.<device>.rd.reqs", "vm_disk_read_requests_total", COUNTER, 1, ("device",),
        "diskio[].rd_reqs", "Read requests completed by the disk."),
    Row("block.<device>.rd.bytes", "vm_disk_read_bytes_total", COUNTER, 1, ("device",),
        "diskio[].rd_bytes", "Bytes read from the disk."),
    Row("block.<device>.rd.times", "vm_disk_read_seconds_total", COUNTER, NS, ("device",),
        "diskio[].rd_times", "Time spent on reads, in seconds (JSON: ns)."),
    Row("block.<device>.wr.reqs", "vm_disk_write_requests_total", COUNTER, 1, ("device",),
        "diskio[].wr_reqs", "Write requests completed by the disk."),
    Row("block.<device>.wr.bytes", "vm_disk_write_bytes_total", COUNTER, 1, ("device",),
        "diskio[].wr_bytes", "Bytes written to the disk."),
    Row("block.<device>.wr.times", "vm_disk_write_seconds_total", COUNTER, NS, ("device",),
        "diskio[].wr_times", "Time spent on writes, in seconds (JSON: ns)."),
    Row("block.<device>.fl.reqs", "vm_disk_flush_requests_total", COUNTER, 1, ("device",),
        "diskio[].fl_reqs", "Flush requests completed by the disk."),
    Row("block.<device>.fl.times", "vm_disk_flush_seconds_total", COUNTER, NS, ("device",),
        "diskio[].fl_times", "Time spent on flushes, in seconds (JSON: ns)."),
    Row("block.<device>.capacity", "vm_disk_capacity_bytes", GAUGE, 1, ("device",),
        "diskio[].capacity", "Size of the disk as the guest sees it, in bytes."),
    Row("block.<device>.allocation", "vm_disk_allocation_bytes", GAUGE, 1, ("device",),
        "diskio[].allocation", "Highest allocated offset in the disk image, in bytes."),
    Row("block.<device>.physical", "vm_disk_physical_bytes", GAUGE, 1, ("device",),
        "diskio[].physical", "Size of the disk image on the host, in bytes."),
    # Set by the sampler from diskErrors(), for a domain paused by an I/O error.
    Row("block.<device>.error.<error>", "vm_disk_error", GAUGE, 1, ("device", "error"), None,
        "1 for each disk libvirt reports an error on (error: %s) while the domain is paused "
        "by an I/O error." % ", ".join(DISK_ERRORS[1:])),
    # -- the running job (jobStats(), while the domain has one) ------------------
    Row("job.type", "vm_job_type", GAUGE, 1, (), None,
        "The domain's running job: %s (bounded: its end is known)."
        % ", ".join("%d %s" % (t, JOB_TYPES[t]) for t in JOB_RUNNING)),
    Row("job.operation", "vm_job_operation", GAUGE, 1, (), None,
        "What the running job does: %s." % codes(JOB_OPERATIONS, 1)),
    Row("job.time_elapsed", "vm_job_elapsed_seconds", GAUGE, 1e-3, (), None,
        "Time since the running job started."),
    Row("job.time_elapsed_net", "vm_job_elapsed_net_seconds", GAUGE, 1e-3, (), None,
        "Time since the running job started, without the time the hosts' clocks differ by."),
    Row("job.time_remaining", "vm_job_remaining_seconds", GAUGE, 1e-3, (), None,
        "Time the running job expects still to take (bounded jobs)."),
    Row("job.downtime", "vm_job_downtime_seconds", GAUGE, 1e-3, (), None,
        "The running migration's downtime, expected or, after the switch-over, real."),
    Row("job.downtime_net", "vm_job_downtime_net_seconds", GAUGE, 1e-3, (), None,
        "The running migration's downtime, without the time the hosts' clocks differ by."),
    Row("job.setup_time", "vm_job_setup_seconds", GAUGE, 1e-3, (), None,
        "Time the running migration took to set up."),
    Row("job.data_total", "vm_job_data_total_bytes", GAUGE, 1, (), None,
        "Bytes the running job has to move in all (memory and disks)."),
    Row("job.data_processed", "vm_job_data_processed_bytes", GAUGE, 1, (), None,
        "Bytes the running job has moved."),
    Row("job.data_remaining", "vm_job_data_remaining_bytes", GAUGE, 1, (), None,
        "Bytes the running job has still to move."),
    Row("job.memory_total", "vm_job_memory_total_bytes", GAUGE, 1, (), None,
        "Guest memory the running job has to move, in bytes."),
    Row("job.memory_processed", "vm_job_memory_processed_bytes", GAUGE, 1, (), None,
        "Guest memory the running job has moved, in bytes (pages sent again count again)."),
    Row("job.memory_remaining", "vm_job_memory_remaining_bytes", GAUGE, 1, (), None,
        "Guest memory the running job has still to move, in bytes."),
    # memory_dirty_rate is in pages: job_keys multiplies it by memory_page_size.
    Row("job.memory_dirty_rate_bytes", "vm_job_memory_dirty_rate_bytes_per_second", GAUGE, 1, (),
        None, "Guest memory dirtied per second during the running migration, in bytes."),
    Row("job.memory_iteration", "vm_job_memory_iteration", GAUGE, 1, (), None,
        "Pass of the running migration over the guest's memory (1 is the first full copy)."),
    Row("job.memory_bps", "vm_job_memory_bandwidth_bytes_per_second", GAUGE, 1, (), None,
        "Rate the running migration moves memory at, in bytes per second."),
    Row("job.<stat>", "vm_job_<stat>", GAUGE, 1, (), None,
        "Field <stat> of the running job's statistics (libvirt jobStats()); '_bps' fields in "
        "bytes per second."),
    # -- opt-in groups (--collect), mapped by rule -------------------------------
    Row("dirtyrate.calc_status", "vm_dirtyrate_calc_status", GAUGE, 1, (), None,
        "Dirty page rate measurement status: 0 unstarted, 1 measuring, 2 measured.", requires="dirtyrate"),
    Row("dirtyrate.calc_start_time", "vm_dirtyrate_calc_start_timestamp_seconds", GAUGE, 1, (), None,
        "When the last dirty page rate measurement started, Unix time.", requires="dirtyrate"),
    Row("dirtyrate.calc_period", "vm_dirtyrate_calc_period_seconds", GAUGE, 1, (), None,
        "Length of the last dirty page rate measurement, in seconds.", requires="dirtyrate"),
    Row("dirtyrate.megabytes_per_second", "vm_dirtyrate_bytes_per_second", GAUGE, MIB, (), None,
        "Memory dirty rate of the domain, in bytes per second.", requires="dirtyrate"),
    Row("dirtyrate.vcpu.<cpu>.megabytes_per_second", "vm_vcpu_dirtyrate_bytes_per_second", GAUGE,
        MIB, ("cpu",), None, "Memory dirty rate of the vCPU, in bytes per second.", requires="dirtyrate"),
    Row("iothread.count", "vm_iothreads", GAUGE, 1, (), None, "Number of I/O threads.", requires="iothread"),
    Row("iothread.<iothread>.<stat>", "vm_iothread_<stat>", GAUGE, 1, ("iothread",), None,
        "I/O thread setting <stat> (libvirt iothread.N.<stat>).", requires="iothread"),
    Row("memory.bandwidth.monitor.<monitor>.node.<node>.bytes.local",
        "vm_memory_bandwidth_local_bytes_total", COUNTER, 1, ("monitor", "node"), None,
        "Memory bandwidth to the local NUMA node, per resctrl monitor and node.", requires="memory"),
    Row("memory.bandwidth.monitor.<monitor>.node.<node>.bytes.total",
        "vm_memory_bandwidth_bytes_total", COUNTER, 1, ("monitor", "node"), None,
        "Memory bandwidth to all NUMA nodes, per resctrl monitor and node.", requires="memory"),
    Row("perf.<stat>", "vm_perf_<stat>_total", COUNTER, 1, (), None,
        "Perf event <stat> counted for the domain (libvirt perf.<stat>).", requires="perf"),
    Row("vm.<stat>.sum", "vm_kvm_<stat>_total", COUNTER, 1, (), None,
        "KVM statistic <stat> of the domain (libvirt vm.<stat>.sum).", requires="vm"),
    Row("vm.<stat>.cur", "vm_kvm_<stat>", GAUGE, 1, (), None,
        "KVM statistic <stat> of the domain (libvirt vm.<stat>.cur).", requires="vm"),
    Row("vm.<stat>.max", "vm_kvm_<stat>_max", GAUGE, 1, (), None,
        "KVM statistic <stat> of the domain, its peak (libvirt vm.<stat>.max).", requires="vm"),
    Row("vcpu.<cpu>.<stat>.sum", "vm_vcpu_kvm_<stat>_total", COUNTER, 1, ("cpu",), None,
        "KVM statistic <stat> of the vCPU (libvirt vcpu.N.<stat>.sum).", requires="vm"),
    Row("vcpu.<cpu>.<stat>.cur", "vm_vcpu_kvm_<stat>", GAUGE, 1, ("cpu",), None,
        "KVM statistic <stat> of the vCPU (libvirt vcpu.N.<stat>.cur).", requires="vm"),
    Row("vcpu.<cpu>.<stat>.max", "vm_vcpu_kvm_<stat>_max", GAUGE, 1, ("cpu",), None,
        "KVM statistic <stat> of the vCPU, its peak (libvirt vcpu.N.<stat>.max).", requires="vm"),
)

class Info(object):
    """A family of a domain's XML (value 1): its labels' values are what domain_info
    found for it (vm_metadata_info's labels are --metadata-label's)."""

    type = GAUGE
    departed = False

    def __init__(self, name, help_text, labels):
        self.name, self.help, self.labels = name, help_text, labels

    def of_record(self, record, registry):
        """[(labels, value)] of one domain's record."""
        labels = registry.info_labels(self)
        return [(tuple(zip(labels, values)), 1) for values in (record.info or {}).get(self.name, ())]


INFO = (
    Info("vm_info", "The domain's type, OS type, architecture, machine and title (value 1).",
         ("type", "os_type", "arch", "machine", "title")),
    Info("vm_openstack_info", "The OpenStack instance a domain is, from nova's metadata (value 1).",
         ("instance_name", "project_id", "project_name", "user_id", "user_name", "flavor",
          "root_type", "root_id")),
    Info("vm_metadata_info", "Values picked from the domain's metadata by --metadata-label "
         "(value 1).", None),
    Info("vm_disk_info", "A disk of the domain: its source, bus, format and cache (value 1).",
         ("device", "type", "source", "bus", "driver_type", "cache", "serial", "readonly")),
    Info("vm_network_info", "A NIC of the domain: its MAC, type, source and model (value 1).",
         ("interface", "mac", "type", "source", "model", "mtu", "interfaceid")),
)


INFO_FAMILY = dict((family.name, family) for family in INFO)


class Recorded(object):
    """A value the domain's record keeps (an attribute; absent while None)."""

    type = GAUGE
    labels = ()
    departed = False

    def __init__(self, name, help_text, attribute):
        self.name, self.help, self.attribute = name, help_text, attribute

    def of_record(self, record, registry):
        value = getattr(record, self.attribute)
        return [((), value)] if value is not None else []


RECORDED = (
    Recorded("vm_state_changed_timestamp_seconds",
             "When the domain's latest lifecycle event arrived, Unix time.", "changed_at"),
)


def detail(*names, **default):
    """A label's value from an event's details: the first of names it has."""
    def pick(details):
        for name in names:
            if name in details:
                return str(details[name])
        return default.get("default", "")
    return pick


class Tally(object):
    """A count of the domain's events of one type (every type: None), labelled by
    their details (labels: (label, pick from the details)).  One without labels is
    0 for every domain until its first such event, so that increase() sees it."""

    type = COUNTER

    def __init__(self, name, help_text, event_type, labels=(), departed=False):
        self.name, self.help, self.event_type = name, help_text, event_type
        self.labels = tuple(label for label, _ in labels)
        self.picks = tuple(pick for _, pick in labels)
        self.departed = departed

    def key(self, details):
        """(family, ((label, value), ...)) an event with these details adds one to."""
        return self.name, tuple(zip(self.labels, (pick(details) for pick in self.picks)))

    def of_record(self, record, registry):
        found = sorted((labels, n) for (name, labels), n in record.tallies.items()
                       if name == self.name)
        return found or ([((), 0)] if not self.labels else [])


TALLIES = (
    Tally("vm_events_total", "Domain events received, by type.", None,
          (("event_type", detail("event_type")),)),
    # device: the disk's target (as the disk families name it) where the event's alias
    # could be resolved (see disk_target)
    Tally("vm_io_errors_total", "Disk I/O errors reported by the domain, by device and action.",
          "IOError", (("device", detail("target", "device")), ("action", detail("action")))),
    Tally("vm_reboots_total", "Guest reboots (the REBOOT event).", "Reboot"),
    Tally("vm_watchdog_events_total", "Guest watchdog expiries, by the action taken.", "Watchdog",
          (("action", detail("action")),)),
    Tally("vm_block_threshold_exceeded_total", "Disks that wrote past their write threshold.",
          "BlockThreshold", (("device", detail("device")),)),
    Tally("vm_control_errors_total", "Times the domain's QEMU monitor failed (CONTROL_ERROR).",
          "ControlError"),
    Tally("vm_memory_failures_total", "Hardware memory errors reported for the domain, by action.",
          "MemoryFailure", (("action", detail("action")),)),
    # A domain that migrated away keeps its migration's figures: its JobCompleted
    # event comes as it goes.
    Tally("vm_jobs_completed_total", "Jobs that ended, by operation and result (completed: a "
          "JobCompleted event, or libvirt's record of a job seen ending without one; failed: "
          "also a migration with no record).", "JobCompleted",
          (("operation", detail("operation")), ("result", detail("result", default="completed"))),
          departed=True),
)


class LastJob(object):
    """A field of the domain's latest JobCompleted event (ms: divided by 1000)."""

    type = GAUGE
    labels = ()
    departed = True

    def __init__(self, name, help_text, field, divisor):
        self.name, self.help, self.field, self.divisor = name, help_text, field, divisor

    def of_record(self, record, registry):
        value = (record.last_job or {}).get(self.field)
        return [((), scaled(value, 1, self.divisor))] if type(value) in (int, float) else []


LAST_JOBS = (
    LastJob("vm_last_job_downtime_seconds",
            "Downtime of the domain's latest completed job (migration, save).", "downtime", 1000),
    LastJob("vm_last_job_elapsed_seconds", "Time the domain's latest completed job took.",
            "time_elapsed", 1000),
    LastJob("vm_last_job_data_bytes", "Bytes the domain's latest completed job moved.",
            "data_processed", 0),
)


class Own(object):
    """One of the agent's own families: rows(agent, sample, now) gives its
    (labels, value) pairs; agent is the HTTP section's Agent, which holds the
    sampling loop, the sampler, the connection, the hub and StatsD."""

    def __init__(self, name, mtype, help_text, rows):
        self.name, self.type, self.help, self.rows = name, mtype, help_text, rows


def _one(value):
    return [((), value)]


def _by(label, items):
    return [(((label, key),), value) for key, value in items]


OWN = (
    Own("vadvisor_build_info", GAUGE, "vadvisor's version, Python's and libvirt's.",
        lambda a, s, now: [(a.build_labels, 1)]),
    Own("vadvisor_libvirt_up", GAUGE, "1 when the agent's libvirt connection is open.",
        lambda a, s, now: _one(1 if a.hypervisor.up else 0)),
    Own("vadvisor_libvirt_info", GAUGE,
        "The libvirt daemon's driver, versions and host name, read at connection (value 1).",
        lambda a, s, now: [(tuple((k, label_value(v)) for k, v in a.hypervisor.info), 1)]
        if a.hypervisor.info else []),
    Own("vadvisor_domains", GAUGE, "Domains in the latest sample.",
        lambda a, s, now: _one(len(s.domains))),
    Own("vadvisor_collect_duration_seconds", GAUGE,
        "Duration of the libvirt calls of the latest sample of each tier (%s)." % ", ".join(TIERS),
        lambda a, s, now: _by("tier", ((t, a.loop.durations[t]) for t in TIERS))),
    Own("vadvisor_last_sample_timestamp_seconds", GAUGE,
        "When the latest sample was taken, Unix time (0: none yet).",
        lambda a, s, now: _one(s.time)),
    Own("vadvisor_sample_age_seconds", GAUGE, "Age of the latest sample.",
        lambda a, s, now: _one(now - s.time if s.time else -1.0)),
    Own("vadvisor_samples_total", COUNTER, "Samples taken, of both tiers.",
        lambda a, s, now: _one(a.loop.samples_total)),
    Own("vadvisor_sample_cpu_seconds_total", COUNTER,
        "CPU time the sampler thread spent taking samples, by tier (%s): kernel reads and "
        "records; libvirt's replies are decoded in its call threads." % ", ".join(TIERS),
        lambda a, s, now: _by("tier", ((t, a.loop.cpu_seconds[t]) for t in TIERS))),
    Own("vadvisor_full_samples_total", COUNTER,
        "Bulk full samples taken: libvirt read every stat group of every domain.",
        lambda a, s, now: _one(a.loop.full_samples_total)),
    Own("vadvisor_full_reads_total", COUNTER,
        "Domains read with every stat group, in bulk full samples and in the fast rounds.",
        lambda a, s, now: _one(a.sampler.full_reads_total)),
    Own("vadvisor_kernel_domains", GAUGE,
        "Running domains whose fast-tier values (CPU, vCPU, RSS, network) the latest "
        "sample all read from the host kernel.",
        lambda a, s, now: _one(s.kernel_domains)),
    Own("vadvisor_collect_seconds_total", COUNTER,
        "Time spent in libvirt's stats calls: its rate is the share of time libvirt is "
        "kept busy.", lambda a, s, now: _one(a.sampler.busy_seconds)),
    Own("vadvisor_libvirt_calls_total", COUNTER,
        "libvirt stats calls made (getAllDomainStats, domainListGetStats).",
        lambda a, s, now: _one(a.sampler.calls_total)),
    Own("vadvisor_libvirt_job_calls_total", COUNTER,
        "libvirt calls made for domains with a job (jobStats) or paused by an I/O error "
        "(diskErrors): none while no domain has either.",
        lambda a, s, now: _by("call", sorted(a.sampler.jobs.calls.items()))),
    Own("vadvisor_sample_errors_total", COUNTER,
        "Samples that failed: a libvirt error or no answer.",
        lambda a, s, now: _one(a.loop.errors_total)),
    Own("vadvisor_libvirt_timeouts_total", COUNTER,
        "libvirt calls that outlived --libvirt-timeout.",
        lambda a, s, now: _one(a.call.timeouts_total)),
    Own("vadvisor_libvirt_stuck_calls", GAUGE,
        "libvirt calls that outlived --libvirt-timeout and have not returned yet.",
        lambda a, s, now: _one(a.call.stuck)),
    Own("vadvisor_host_cpus", GAUGE, "The host's logical CPUs (libvirt getInfo).",
        lambda a, s, now: _one(s.host["cpus"]) if "cpus" in s.host else []),
    Own("vadvisor_host_memory_bytes", GAUGE, "The host's memory (libvirt getMemoryStats).",
        lambda a, s, now: _one(s.host["memory_bytes"]) if "memory_bytes" in s.host else []),
    Own("vadvisor_host_memory_free_bytes", GAUGE,
        "The host's memory free, in buffers or cached (libvirt getMemoryStats).",
        lambda a, s, now: _one(s.host["memory_free_bytes"]) if "memory_free_bytes" in s.host
        else []),
    Own("vadvisor_host_active_domains", GAUGE, "Domains running or paused on the host.",
        lambda a, s, now: _one(s.host.get("running", 0))),
    Own("vadvisor_host_vcpus_allocated", GAUGE, "vCPUs of the active domains, together.",
        lambda a, s, now: _one(s.host.get("vcpus", 0))),
    Own("vadvisor_host_memory_allocated_bytes", GAUGE,
        "Memory the active domains are given (their balloon sizes), together.",
        lambda a, s, now: _one(s.host.get("memory_allocated_bytes", 0))),
    Own("vadvisor_events_total", COUNTER, "Domain events received, by type.",
        lambda a, s, now: _by("event_type", sorted(
            (a.hub.counts if a.hub else dict.fromkeys(ALL_EVENT_TYPES + ("Unknown",), 0)).items()))),
    Own("vadvisor_event_streams", GAUGE, "Open event streams.",
        lambda a, s, now: _one(a.hub.streams() if a.hub else 0)),
    Own("vadvisor_statsd_packets_total", COUNTER, "StatsD datagrams sent.",
        lambda a, s, now: _one(a.statsd.packets_total if a.statsd else 0)),
    Own("vadvisor_statsd_errors_total", COUNTER,
        "StatsD failures: unresolved host, refused or failed sends, oversized lines.",
        lambda a, s, now: _one(a.statsd.errors_total if a.statsd else 0)),
)


# Labels whose value is the device's name, found under this key, not its index.
NAMED_DEVICES = {"interface": "net.%s.name", "device": "block.%s.name",
                 "monitor": "memory.bandwidth.monitor.%s.name"}
METRIC_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


class Family(object):
    """A sampled family as it is exported: name, type, help and its place in the
    output (a rule of ROWS makes one per statistic it meets)."""

    __slots__ = ("name", "type", "help", "order")

    def __init__(self, name, mtype, help_text, order):
        self.name, self.type, self.help, self.order = name, mtype, help_text, order


class Target(object):
    """Where one libvirt key goes: a family plus its device labels and scales."""

    __slots__ = ("family", "devices", "mul", "div", "json", "json_mul", "json_div",
                 "json_enum", "row", "summary")

    def __init__(self, row, family, devices, scale):
        self.row, self.family, self.devices = row, family, devices
        self.mul, self.div = split_scale(scale)
        self.summary = (family, family.name + "{", self.mul, self.div, row.value)
        self.json = parse_json_place(row.json)
        self.json_enum = row.json_scale if isinstance(row.json_scale, tuple) else None
        self.json_mul, self.json_div = split_scale(1 if self.json_enum else row.json_scale)


def split_scale(scale):
    """(multiplier, divisor): dividing by 1e9 is exact where * 1e-9 is not."""
    if scale >= 1:
        return scale, 0
    return 1, float(round(1 / scale))


def parse_json_place(place):
    """'a.b' -> (None, ('a', 'b')); 'x.list[].key' -> (('x', 'list'), ('key',))."""
    if place is None:
        return None
    if "[]." in place:
        head, tail = place.split("[].")
        return tuple(head.split(".")), tuple(tail.split("."))
    return None, tuple(place.split("."))


def stat_name(stat, scale):
    """Stat names of the rules to Prometheus words: '*_ns' become seconds, '*_bps' bytes per second."""
    stat = re.sub(r"[^a-zA-Z0-9_]", "_", stat)
    if stat.endswith("_ns"):
        return stat[:-3] + "_seconds", NS
    if stat.endswith("_bps"):       # the job's statistics' rates
        return stat[:-4] + "_bytes_per_second", scale
    return stat, scale


class Registry(object):
    """The families of one configuration (--collect's groups, --metadata-label's
    labels), in the order /metrics shows them; libvirt keys resolved to their
    rows once per distinct key."""

    def __init__(self, collect=OPTIONAL_GROUPS, metadata_labels=()):
        self.rows = [r for r in ROWS if r.requires is None or r.requires in collect]
        self.departed_rows = [r for r in self.rows if r.departed is not None]
        self.metadata_labels = metadata_labels
        self.context = INFO + RECORDED
        self.tallies, self.last_jobs, self.own = TALLIES, LAST_JOBS, OWN
        self.families = {}
        self.cache = {}
        for row in self.rows:
            if "<stat>" not in row.name:
                self._family(row.name, row.type, row.help)

    def info_labels(self, family):
        """An info family's labels beyond uuid and name."""
        if family.labels is None:
            return tuple(label for label, _ in self.metadata_labels)
        return family.labels

    def event_series(self, event_type, details):
        """[(family, labels)] of the tallies an event adds one to."""
        details = dict(details, event_type=event_type)
        return [t.key(details) for t in self.tallies
                if t.event_type is None or t.event_type == event_type]

    def job_ended(self, operation, result):
        """The tally of a job seen ending without a JobCompleted event."""
        return [t.key({"operation": operation, "result": result}) for t in self.tallies
                if t.event_type == "JobCompleted"]

    def _family(self, name, mtype, help_text):
        family = self.families.get(name)
        if family is None:
            family = Family(name, mtype, help_text, len(self.families))
            self.families[name] = family
        elif family.type != mtype:
            return None
        return family

    def targets(self, key):
        """The tuple of Targets for a libvirt key (empty for keys not exported)."""
        return cached(self.cache, key, lambda: tuple(self._resolve(key)), 200000)

    def _resolve(self, key):
        """The rows a key matches; a rule (<stat>) only where no row named it."""
        named = False
        for row in self.rows:
            match = row.regex.match(key)
            if match is None:
                continue
            groups = match.groupdict()
            name, scale, help_text = row.name, row.scale, row.help
            if "stat" not in groups:
                named = True
            elif named:
                continue
            else:
                word, scale = stat_name(groups["stat"], scale)
                name = name.replace("<stat>", word)
                help_text = help_text.replace("<stat>", groups["stat"])
                if not METRIC_NAME_RE.match(name):
                    continue
            family = self._family(name, row.type, help_text)
            if family is None:
                continue
            devices = tuple(self._device(label, key, groups[label]) for label in row.labels)
            yield Target(row, family, devices, scale)

    @staticmethod
    def _device(label, key, index):
        """(label, key holding the device's name or None, index)."""
        name_key = NAMED_DEVICES.get(label)
        return label, name_key % index if name_key else None, index

    def json_key(self, key):
        """True when the key has a place in the JSON API (and so in history)."""
        for target in self.targets(key):
            if target.json is not None:
                return True
        return False


# =============================================================================
# Formatters: Prometheus text and OpenMetrics, StatsD, JSON, specs and info labels
# =============================================================================

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class Exposition(object):
    """Prometheus text and OpenMetrics of every family of the registry: the one
    renderer of /metrics and --once.

    domains() is what a sample and the domains' records make (rendered once per
    sample by /metrics), own() the agent's own families (every scrape).  A
    series' labels only change when a domain's keys or device names do, so they
    are kept per domain (DomainPlan, for the domains of the latest sample) and a
    sample costs a lookup and a number per series."""

    def __init__(self, registry):
        self.registry = registry
        self.plans = {}         # uuid -> DomainPlan

    def render(self, agent, sample, openmetrics=False):
        """The whole exposition: every domain's families, the agent's own, '# EOF'."""
        return (self.domains(sample, agent.store, openmetrics)
                + self.own(agent, sample, time.time(), openmetrics)
                + ("# EOF\n" if openmetrics else ""))

    def domains(self, sample, store, openmetrics=False):
        """Every vm_* family of the sample's domains (and the departed ones where a
        family says so), families contiguous however domains interleave."""
        buckets = self.sampled(sample)
        parts = []
        for family in sorted(buckets, key=lambda f: f.order):
            parts.append(family_header(family, openmetrics))
            parts.extend(buckets[family])
        present = [(uuid, name, store.get(uuid)) for uuid, name, _ in sample.domains]
        departed = [(uuid, name, store.get(uuid)) for uuid, name in sample.gone]
        for family in self.registry.context + self.registry.tallies + self.registry.last_jobs:
            domains = present + departed if family.departed else present
            if isinstance(family, Info):
                domains = sorted(domains)       # by uuid
            lines = self.domain_family(family, [(u, n, r) for u, n, r in domains if r is not None])
            if lines:
                parts.append(family_header(family, openmetrics))
                parts.extend(lines)
        return "".join(parts)

    def sampled(self, sample):
        """{family: [line, ...]} of the sampled families of every domain of the sample."""
        buckets = collections.defaultdict(list)
        for uuid, name, stats in sample.domains:
            plan = self.plans.get(uuid)
            if plan is None or not plan.fits(name, stats):
                plan = self.plans[uuid] = DomainPlan(self.registry, uuid, name, stats)
            for labels, key, (family, opening, mul, div, value_of) in zip(
                    plan.labels, plan.keys, plan.targets):
                value = stats[key]
                kind = type(value)
                if value_of:
                    text = format_number(value_of(value))
                elif kind is int and not div and mul == 1:
                    text = str(value)
                elif kind in NUMBER_TYPES:
                    text = format_number(scaled(value, mul, div))
                else:
                    continue    # a value that is not a number this time
                buckets[family].append(opening + labels + text + "\n")
        for row in self.registry.departed_rows:
            family = self.registry.families[row.name]
            for uuid, name in sample.gone:
                buckets[family].append(series_line(row.name, (("uuid", uuid), ("name", name)),
                                                   row.departed))
        if len(self.plans) > len(sample.domains):     # forget domains that left
            present = set(uuid for uuid, _, _ in sample.domains)
            for uuid in [u for u in self.plans if u not in present]:
                del self.plans[uuid]
        return buckets

    def domain_family(self, family, domains):
        """The lines of a family of the domains' records: [(uuid, name, DomainRecord)]."""
        lines, seen = [], set()
        for uuid, name, record in domains:
            head = (("uuid", uuid), ("name", name))
            for labels, value in family.of_record(record, self.registry):
                line = series_line(family.name, head + labels, value)
                if line not in seen:        # two devices alike in every label make one series
                    seen.add(line)
                    lines.append(line)
        return lines

    def own(self, agent, sample, now, openmetrics=False):
        """The agent's own families."""
        parts = []
        for family in self.registry.own:
            parts.append(family_header(family, openmetrics))
            parts.extend(series_line(family.name, labels, value)
                         for labels, value in family.rows(agent, sample, now))
        return "".join(parts)


class DomainPlan(object):
    """One domain's series labels, valid while its keys and device names stay.

    A domain has a handful of label sets (itself, each vCPU, disk and NIC);
    each is one string, '{uuid="..",name="..",device=".."} ' less the brace,
    shared by every family that uses it."""

    __slots__ = ("name", "shape", "name_keys", "names", "labels", "keys", "targets")

    def __init__(self, registry, uuid, name, stats):
        self.name, self.shape = name, tuple(stats)
        prefix = 'uuid="%s",name="%s"' % (escape_label(uuid), escape_label(name))
        name_keys, self.labels, self.keys, self.targets = set(), [], [], []
        shared = {}
        for key, value in stats.items():
            if type(value) not in NUMBER_TYPES:
                continue
            for t in registry.targets(key):
                name_keys.update(name_key for _, name_key, _ in t.devices if name_key)
                labels = prefix + "".join(',%s="%s"' % (label, escape_label(device))
                                          for label, device in device_labels(t, stats)) + "} "
                self.labels.append(shared.setdefault(labels, labels))
                self.keys.append(key)
                self.targets.append(t.summary)      # shared by every domain
        self.name_keys = tuple(sorted(name_keys))
        self.names = tuple(stats.get(k) for k in self.name_keys)

    def fits(self, name, stats):
        return (name == self.name and tuple(stats) == self.shape
                and tuple(stats.get(k) for k in self.name_keys) == self.names)


def family_header(family, openmetrics):
    name = family.name
    if openmetrics and family.type == COUNTER and name.endswith("_total"):
        name = name[:-6]
    return "# HELP %s %s\n# TYPE %s %s\n" % (name, escape_help(family.help), name, family.type)


def series_line(name, labels, value):
    text = ",".join('%s="%s"' % (k, escape_label(str(v))) for k, v in labels)
    return "%s%s %s\n" % (name, "{%s}" % text if text else "", format_number(value))


def device_labels(target, stats):
    """((label, value), ...) of a target's devices: a name from stats, or the index."""
    return tuple((label, str(stats.get(name_key, index)) if name_key else index)
                 for label, name_key, index in target.devices)


def escape_label(value):
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def scaled(value, mul, div):
    if div:
        return value / div
    if mul != 1:
        return value * mul
    return value


def format_number(value):
    """A sample value as the exposition formats spell it."""
    if type(value) is float:
        if value != value:
            return "NaN"
        if value in (math.inf, -math.inf):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(int(value))


def sample_series(registry, sample, wanted=None):
    """Every sampled value of a sample, by the registry, in base units:
    (uuid, name, family, ((label, value), ...), number), the departed domains'
    included.  StatsD and the overview use it; wanted, a set of family names,
    keeps those alone."""
    targets = registry.targets
    for uuid, name, stats in sample.domains:
        for key, value in stats.items():
            if type(value) not in NUMBER_TYPES:
                continue
            for t in targets(key):
                if wanted is not None and t.family.name not in wanted:
                    continue
                number = t.row.value(value) if t.row.value else scaled(value, t.mul, t.div)
                yield uuid, name, t.family, device_labels(t, stats), number
    for row in registry.departed_rows:
        if wanted is None or row.name in wanted:
            family = registry.families[row.name]
            for uuid, name in sample.gone:
                yield uuid, name, family, (), row.departed


# -- StatsD push ---------------------------------------------------------------

# Keys: <prefix>.<uuid>.<metric> and <prefix>.<uuid>.<device>.<metric>, where
# <metric> is the Prometheus family name without "vm_", "_" turned into ".",
# and <device> is the device's name (interface, disk, monitor) or, for an
# index, the label and the index ("cpu0", "iothread1", "node0").  Every value
# is an absolute gauge in base units: a "|c" counter would be read as an
# increment, and nanoseconds lose precision in StatsD's JavaScript numbers.

STATSD_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_\-]")
STATSD_TAG_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.\-]")


def statsd_word(text):
    """A key segment the reference server keeps as it is (no '.', which separates)."""
    return STATSD_UNSAFE_RE.sub("_", text) or "_"


def statsd_metric(family):
    return family.name[3:].replace("_", ".") if family.name.startswith("vm_") \
        else family.name.replace("_", ".")


def statsd_device(devices):
    """'vda', 'cpu0', 'mon0.node1', 'vda.unspec': the device part of a key or tag."""
    return ".".join(statsd_word(value) if label in NAMED_DEVICES or label in WORD_PLACEHOLDERS
                    else label + value for label, value in devices)


def statsd_value(number):
    """The value part; a negative gauge is sent as a reset to 0 then a delta,
    since '-5|g' alone means 'subtract 5'.  Both go into one datagram."""
    text = format_number(number)
    return ("0|g", text + "|g") if number < 0 else (text + "|g",)


def statsd_lines(registry, sample, prefix="vm", tags=False):
    """[(line, ...)] per sampled value: the lines of one group must share a datagram."""
    groups = []
    for uuid, name, family, devices, number in sample_series(registry, sample):
        if number != number or number in (math.inf, -math.inf):
            continue    # StatsD has no spelling for NaN or infinity
        metric = statsd_metric(family)
        if tags:
            key = "%s.%s" % (prefix, metric)
            tag = "|#uuid:%s,name:%s" % (uuid, STATSD_TAG_UNSAFE_RE.sub("_", name))
            if devices:
                tag += ",device:" + statsd_device(devices)
        else:
            parts = [prefix, uuid] + ([statsd_device(devices)] if devices else []) + [metric]
            key, tag = ".".join(parts), ""
        groups.append(tuple("%s:%s%s" % (key, value, tag) for value in statsd_value(number)))
    return groups


def statsd_packets(groups, max_size):
    """Datagrams of at most max_size bytes; a group never split.

    Returns (packets, dropped groups that alone exceed max_size)."""
    packets, dropped, current, size = [], [], [], 0
    for group in groups:
        data = "\n".join(group).encode("utf-8")
        if len(data) > max_size:
            dropped.append(group)
            continue
        if current and size + 1 + len(data) > max_size:
            packets.append(b"\n".join(current))
            current, size = [], 0
        size += len(data) + (1 if current else 0)
        current.append(data)
    if current:
        packets.append(b"\n".join(current))
    return packets, dropped


class StatsdEmitter(object):
    """Sends the latest sample to StatsD every --statsd-interval seconds.

    Its own thread: a dead, unresolvable or refusing target costs this thread
    time, never the sampler's or a request's.  The host name is resolved again
    every interval; errors are counted and logged at most once a minute.
    """

    def __init__(self, loop, registry, host, port=8125, interval=15.0, prefix="vm", tags=False,
                 max_packet=1432):
        self.loop, self.registry, self.host, self.port = loop, registry, host, port
        self.interval, self.prefix, self.tags, self.max_packet = interval, prefix, tags, max_packet
        self.packets_total = 0
        self.errors_total = 0
        self.last_warning = 0.0
        self.sock = self.address = None
        self.stopping = threading.Event()

    def start(self):
        threading.Thread(target=self.run, name="statsd", daemon=True).start()

    def stop(self):
        self.stopping.set()

    def run(self):
        while not self.stopping.wait(self.interval):
            try:
                self.send(self.loop.latest)
            except Exception as exc:  # never let the emitter thread die
                self.failed("StatsD push failed: %s" % exc)

    def send(self, sample):
        if not sample.time:
            return      # nothing sampled yet
        groups = statsd_lines(self.registry, sample, self.prefix, self.tags)
        packets, dropped = statsd_packets(groups, self.max_packet)
        if dropped:
            self.failed("%d StatsD lines longer than --statsd-max-packet %d dropped, e.g. %s"
                        % (len(dropped), self.max_packet, dropped[0][0][:80]), len(dropped))
        try:
            sock = self.connect()
            for i, packet in enumerate(packets):
                if i and not i % STATSD_BURST:
                    self.stopping.wait(STATSD_BURST_GAP)
                sock.send(packet)
                self.packets_total += 1
        except (OSError, UnicodeError) as exc:
            self.disconnect()
            self.failed("StatsD %s:%d: %s" % (self.host, self.port, exc))

    def connect(self):
        """A UDP socket connected to the host's current address.

        Connected and kept, so an ICMP refusal of one datagram shows up as an
        error on a later send instead of passing unnoticed."""
        family, _, _, _, address = socket.getaddrinfo(self.host, self.port, 0,
                                                      socket.SOCK_DGRAM)[0]
        if self.sock is None or address != self.address:
            self.disconnect()
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.sock.connect(address)
            self.address = address
        return self.sock

    def disconnect(self):
        if self.sock is not None:
            self.sock.close()
        self.sock = self.address = None

    def failed(self, message, count=1):
        self.errors_total += count
        now = time.monotonic()
        if now - self.last_warning >= 60 or not self.last_warning:
            self.last_warning = now
            log.warning("%s (errors so far: %d; logged at most once a minute)",
                        message, self.errors_total)


# -- JSON: stats and the overview ----------------------------------------------

def json_text(value, target):
    """A value as JSON text in the JSON API's unit; NaN and infinities become null."""
    if target.json_enum:
        return '"%s"' % enum_name(target.json_enum, int(value))
    value = scaled(value, target.json_mul, target.json_div)
    if type(value) is float:
        if value != value or value in (math.inf, -math.inf):
            return "null"
        if not value.is_integer() or abs(value) >= 2 ** 53:
            return repr(value)
    return str(int(value))


SLOT = "\0%d\0"    # a placeholder json.dumps writes as "\u0000<n>\u0000"
SLOT_RE = re.compile(r'"\\u0000(\d+)\\u0000"')


class JsonTemplate(object):
    """The JSON text of every sample with one layout, with a slot per value.

    A layout fixes a sample's whole structure (keys, devices, their names),
    so the structure is built and encoded once; a record then costs a single
    %-format of its converted values.
    """

    def __init__(self, registry, layout):
        steps = [(None, None)]  # slot 0: the timestamp

        def slot(index, target):
            steps.append((index, target))
            return SLOT % (len(steps) - 1)
        skeleton = json_skeleton(registry, layout, slot)
        skeleton["timestamp"] = SLOT % 0
        text = json.dumps(skeleton, separators=(",", ":")).replace("%", "%%")
        order = []

        def fill(match):
            order.append(steps[int(match.group(1))])
            return "%s"
        self.text = SLOT_RE.sub(fill, text)
        self.steps = order

    def render(self, when, values):
        return self.text % tuple(['"%s"' % rfc3339(when) if index is None
                                  else json_text(values[index], target)
                                  for index, target in self.steps])


def json_skeleton(registry, layout, leaf):
    """A sample's structure, each value given by leaf(index in values, target)."""
    keys, names = layout
    names = dict(names)
    out = {"timestamp": None}
    devices = {}            # (list path, index) -> that device's entry
    for position, key in enumerate(keys):
        for t in registry.targets(key):
            if t.json is None:
                continue
            list_path, field = t.json
            value = leaf(position, t)
            where = out
            if list_path is not None:
                label, name_key, index = t.devices[0]
                where = devices.get((list_path, index))
                if where is None:
                    where = devices[(list_path, index)] = (
                        {"index": int(index)} if name_key is None
                        else {"name": names.get(name_key, index)})
            put(where, field, value)
    for (list_path, index), entry in sorted(devices.items(), key=lambda d: int(d[0][1])):
        parent = out
        for step in list_path[:-1]:
            parent = parent.setdefault(step, {})
        parent.setdefault(list_path[-1], []).append(entry)
    return out


def put(where, path, value):
    for step in path[:-1]:
        where = where.setdefault(step, {})
    where[path[-1]] = value


# The overview (/api/v1.0/overview, the page's table): one row per domain, its
# columns from the registry's families, summed over devices, each with a heading
# and a kind the page shows it by.  How a column is worked out: "value"; "rate":
# per second between the two latest samples; "percent": the same, of one core;
# "full rate": per second between the domain's two latest full reads (its disks
# are read only then); "value or RSS": the value, or the domain's RSS where it has
# none, which the "mark" column after it then says ("RSS", else "").  The page shows
# a mark beside the column before it.
OVERVIEW_FIXED = (      # (column, heading, kind)
    ("uuid", "uuid", "key"), ("name", "Name", "text"), ("state", "State", "state"),
    ("stale", "stale", "flag"), ("context", "Context", "text"))
OVERVIEW_COLUMNS = (    # (column, family, how, heading, kind)
    ("vcpus", "vm_vcpus", "value", "vCPUs", "number"),
    ("cpu_percent", "vm_cpu_seconds_total", "percent", "CPU %", "number"),   # host's cores used
    ("cpu_pressure_percent", "vm_pressure_cpu_waiting_seconds_total", "percent", "CPU wait %",
     "number"),
    ("memory_bytes", "vm_memory_bytes", "value", "Memory", "bytes"),
    ("rss_bytes", "vm_memory_rss_bytes", "value", "RSS", "bytes"),
    # used in the guest, by its own count; where it has none, its RSS, marked so by the next
    ("used_bytes", "vm_memory_used_bytes", "value or RSS", "Used in guest", "bytes"),
    ("used_mark", "vm_memory_used_bytes", "mark", "", "mark"),
    ("disk_read_bytes_per_second", "vm_disk_read_bytes_total", "full rate", "Disk read/s", "bytes"),
    ("disk_write_bytes_per_second", "vm_disk_write_bytes_total", "full rate", "Disk write/s",
     "bytes"),
    ("network_receive_bytes_per_second", "vm_network_receive_bytes_total", "rate", "Net rx/s",
     "bytes"),
    ("network_transmit_bytes_per_second", "vm_network_transmit_bytes_total", "rate", "Net tx/s",
     "bytes"),
)
OVERVIEW_FAMILIES = frozenset(column[1] for column in OVERVIEW_COLUMNS)

# The page's charts of one domain's history (/api/v1.0/stats/<uuid>): (title, unit,
# how, [(series, family)]).  A family labelled by vCPU draws a line per vCPU; one
# labelled by disk or NIC sums its devices.  chart_spec finds each series' place
# and unit in the registry.
CHARTS = (
    ("CPU per vCPU", "percent", "rate", (("vCPU", "vm_vcpu_seconds_total"),)),
    ("Steal (waiting for a host CPU)", "percent", "rate",
     (("vCPU", "vm_vcpu_delay_seconds_total"),)),
    ("Pressure (some task waited)", "percent", "rate",
     (("CPU", "vm_pressure_cpu_waiting_seconds_total"),
      ("memory", "vm_pressure_memory_waiting_seconds_total"),
      ("I/O", "vm_pressure_io_waiting_seconds_total"))),
    ("Memory", "bytes", "value", (("assigned", "vm_memory_bytes"), ("RSS", "vm_memory_rss_bytes"))),
    ("Disk", "bytes/s", "full rate", (("read", "vm_disk_read_bytes_total"),
                                      ("write", "vm_disk_write_bytes_total"))),
    ("Network", "bytes/s", "rate", (("rx", "vm_network_receive_bytes_total"),
                                    ("tx", "vm_network_transmit_bytes_total"))),
)


def chart_spec(registry):
    """The charts as the page draws them: each series' place in a JSON sample (a list
    of devices and a field in each, or a field) and the factor from its JSON unit to
    the chart's (seconds as percent of a core), taken from the family's row."""
    rows = dict((row.name, row) for row in registry.rows)
    charts = []
    for title, unit, how, series in CHARTS:
        lines = []
        for name, family in series:
            row = rows[family]
            devices, field = parse_json_place(row.json)
            factor = row.scale / row.json_scale * (100 if unit == "percent" else 1)
            lines.append({"name": name, "list": devices, "field": field,
                          "factor": factor, "each": "cpu" in row.labels})
        charts.append({"title": title, "unit": unit, "how": how, "series": lines})
    return charts


def counter_rate(now, before, seconds):
    if now is None or before is None or seconds <= 0 or now < before:
        return None         # no earlier value, or the counter started again
    return (now - before) / seconds


def domain_context(info, registry):
    """Whose VM it is, in a few words: its OpenStack project, its --metadata-label
    values, else its title."""
    def labels(name):       # [(label, value)] of the family's first series, or None
        rows = (info or {}).get(name)
        return list(zip(registry.info_labels(INFO_FAMILY[name]), rows[0])) if rows else None
    openstack = labels("vm_openstack_info")
    if openstack is not None:
        project = dict(openstack)["project_name"] or dict(openstack)["project_id"]
        return "project %s" % project if project else ""
    picked = labels("vm_metadata_info")
    if picked:
        return " ".join("%s=%s" % (label, value) for label, value in picked if value)
    return dict(labels("vm_info") or ()).get("title", "")


class Overview(object):
    """The overview document: columns (with their headings and kinds) once, then one
    list of values per domain, made once per sample.

    Rates span the latest sample and the one before it (at least half an
    --interval older); full-tier counters span the domain's two latest full
    reads, whose rate is kept between them."""

    def __init__(self, registry):
        self.registry = registry
        self.full_rates = {}    # uuid -> {family: rate between its two latest full reads}
        self.totals = {}        # sample seq -> family_totals, of the latest two samples

    def body(self, sample, previous, store, interval):
        """The document's JSON for a sample (made once per sample: see Agent.overview_body)."""
        contexts = dict((uuid, domain_context(record.info, self.registry))
                        for uuid, record in ((u, store.get(u)) for u, _, _ in sample.domains)
                        if record is not None)
        doc = self.document(sample, previous, contexts)
        doc["interval"] = interval
        return (json.dumps(doc, separators=(",", ":")) + "\n").encode("utf-8")

    def family_totals(self, sample):
        """{uuid: {family: value summed over devices}} of the overview's families."""
        totals = self.totals.get(sample.seq)
        if totals is None:
            totals = {}
            for uuid, _, family, _, number in sample_series(self.registry, sample,
                                                            OVERVIEW_FAMILIES):
                mine = totals.setdefault(uuid, {})
                mine[family.name] = mine.get(family.name, 0) + number
            for seq in sorted(self.totals)[:-1]:
                del self.totals[seq]
            self.totals[sample.seq] = totals
        return totals

    def document(self, sample, previous, contexts):
        totals = self.family_totals(sample)
        before = self.family_totals(previous) if previous is not None else {}
        earlier_stats = dict((u, st) for u, _, st in previous.domains) if previous else {}
        seconds = sample.time - previous.time if previous is not None else 0
        rows = []
        for uuid, name, stats in sample.domains:
            mine, earlier = totals.get(uuid, {}), before.get(uuid, {})
            row = [uuid, name, enum_name(DOMAIN_STATES, stats.get("state.state")),
                   stats.get("vadvisor.stale", 0), contexts.get(uuid, "")]
            for _, family, how, _, _ in OVERVIEW_COLUMNS:
                if how == "mark":       # the RSS stood in for the family's value
                    stood_in = mine.get(family) is None and row[-1] is not None
                    row.append("RSS" if stood_in else "")
                    continue
                if how == "value":
                    value = mine.get(family)
                elif how == "value or RSS":
                    value = mine.get(family, mine.get("vm_memory_rss_bytes"))
                elif how == "full rate":
                    value = self.full_rate(uuid, family, sample.time, stats, mine,
                                           previous, earlier_stats.get(uuid), earlier)
                else:
                    value = counter_rate(mine.get(family), earlier.get(family), seconds)
                    value = None if value is None else value * 100 if how == "percent" else value
                row.append(None if value is None else round(value, 2))
            rows.append(row)
        for uuid in [u for u in self.full_rates if u not in totals]:
            del self.full_rates[uuid]
        columns = [c[:1] + c[-2:] for c in OVERVIEW_FIXED + OVERVIEW_COLUMNS]
        cpu = [row[len(OVERVIEW_FIXED) + 1] for row in rows]       # cpu_percent
        host = dict(sample.host, cpu_cores_used=round(sum(c for c in cpu if c) / 100.0, 2))
        return {"timestamp": rfc3339(sample.time) if sample.time else None, "seq": sample.seq,
                "columns": [c[0] for c in columns], "headings": [c[1] for c in columns],
                "kinds": [c[2] for c in columns], "domains": rows, "host": host}

    def full_rate(self, uuid, family, when, stats, mine, previous, earlier_stats, earlier):
        """The rate of a counter read only at full reads, dated by their stats_age."""
        kept = self.full_rates.setdefault(uuid, {})
        read_at = when - stats.get("vadvisor.stats_age", 0)
        if earlier_stats is not None:
            before_at = previous.time - earlier_stats.get("vadvisor.stats_age", 0)
            if read_at - before_at > 0.5:
                kept[family] = counter_rate(mine.get(family), earlier.get(family),
                                            read_at - before_at)
        return kept.get(family)


# -- Specs and info labels from the domain XML ---------------------------------

# Domain XML to JSON.  Lossless rules:
#  * an element becomes an object: its attributes are keys, its text (unless
#    only white space) is "value", each child element is a key named by its tag;
#  * a tag that occurs more than once under one parent becomes a list of
#    objects, in document order;
#  * <devices> becomes a list of {"family": <tag>, ...} in document order;
#  * text whose key is taken by a "value" attribute is stored as "value_text",
#    a child whose tag is taken by an attribute or the text as "<tag>_element";
#  * <memory>, <currentMemory> and <maxMemory> values and the attributes
#    index, port, startport and vram become integers (as in the original).
INTEGER_TEXT = ("memory", "currentMemory", "maxMemory")
INTEGER_ATTRIBUTES = ("index", "port", "startport", "vram")


def domain_spec(xml):
    return element_json(ElementTree.fromstring(xml))


def element_json(elem):
    obj = {}
    for name, value in elem.attrib.items():
        obj[name] = int(value) if name in INTEGER_ATTRIBUTES and value.lstrip("-").isdigit() \
            else value
    text = elem.text
    if text is not None and text.strip():
        if elem.tag in INTEGER_TEXT and text.strip().isdigit():
            text = int(text)
        obj["value_text" if "value" in obj else "value"] = text
    reserved = set(obj)     # attributes and text
    repeated = set()
    for child in elem:
        if not isinstance(child.tag, str):
            continue  # comments and processing instructions
        if child.tag == "devices":
            value = [dict([("family", dev.tag)] + list(element_json(dev).items()))
                     for dev in child if isinstance(dev.tag, str)]
        else:
            value = element_json(child)
        key = child.tag + "_element" if child.tag in reserved else child.tag
        if key not in obj:
            obj[key] = value
        elif key in repeated:
            obj[key].append(value)
        else:
            obj[key] = [obj[key], value]
            repeated.add(key)
    return obj


#
# Gauges of value 1 whose labels say what a domain is and whose it is, joined
# in PromQL with `* on(uuid) group_left(...)`.  They come from the XML the spec
# thread reads anyway: no libvirt call per sample.  Every value is the user's
# (domain XML, metadata): escaped, and cut at LABEL_VALUE_LIMIT characters.

NOVA_NAMESPACES = tuple("http://openstack.org/xmlns/libvirt/nova/%s" % v
                        for v in ("1.0", "1.1", "1.2"))
LABEL_VALUE_LIMIT = 1024
LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def label_value(text):
    """A label value from user-controlled XML: text, at most LABEL_VALUE_LIMIT characters
    (a longer one ends with a visible '…')."""
    text = "" if text is None else str(text).strip()
    if len(text) > LABEL_VALUE_LIMIT:
        text = text[:LABEL_VALUE_LIMIT - 1] + "\u2026"
    return text


def attribute(root, path, name):
    found = root.find(path) if path else root
    return found.get(name) if found is not None else None


def element_text(root, path):
    found = root.find(path)
    return found.text if found is not None else None


def disk_source(disk):
    """A disk's source as one string: a file, a device, pool/volume or protocol://host/name."""
    source = disk.find("source")
    if source is None:
        return ""       # a CD-ROM without media
    kind = disk.get("type")
    if kind == "network":
        host = source.find("host")
        where = ""
        if host is not None:
            where = host.get("name") or host.get("socket") or ""
            if host.get("port"):
                where += ":" + host.get("port")
        return "%s://%s/%s" % (source.get("protocol", ""), where, source.get("name", ""))
    if kind == "volume":
        return "%s/%s" % (source.get("pool", ""), source.get("volume", ""))
    for name in ("file", "dev", "dir", "name"):
        if source.get(name):
            return source.get(name)
    return ""


def nic_source(nic):
    """A NIC's source: its bridge, network or device (a PCI address for hostdev)."""
    source = nic.find("source")
    if source is None:
        return ""
    for name in ("bridge", "network", "dev", "path"):
        if source.get(name):
            return source.get(name)
    address = source.find("address")
    if address is not None and address.get("bus"):
        return "%s:%s:%s.%s" % tuple(address.get(k, "0x0")[2:].rjust(w, "0") for k, w in (
            ("domain", 4), ("bus", 2), ("slot", 2), ("function", 1)))
    return ""


def domain_values(root):
    """The numbers of a domain's XML the sampled records carry (the registry maps
    them like libvirt's): its balloon's statistics period, 0 where none is set;
    nothing without a balloon device."""
    balloon = root.find("devices/memballoon")
    if balloon is None or balloon.get("model") in (None, "none"):
        return {}
    period = attribute(balloon, "stats", "period")
    return {"xml.balloon.period": int(period) if period and period.isdigit() else 0}


def domain_info(root, metadata_labels=()):
    """{family: [(label value, ...), ...]} of a domain's XML, labels as the registry's
    INFO declares them (vm_metadata_info: as --metadata-label does)."""
    info = {"vm_info": [(root.get("type"), element_text(root, "os/type"),
                         attribute(root, "os/type", "arch"), attribute(root, "os/type", "machine"),
                         element_text(root, "title"))]}
    for ns in NOVA_NAMESPACES:
        nova = root.find("metadata/{%s}instance" % ns)
        if nova is not None:
            n = "{%s}" % ns
            info["vm_openstack_info"] = [(
                element_text(nova, n + "name"),
                attribute(nova, n + "owner/" + n + "project", "uuid"),
                element_text(nova, n + "owner/" + n + "project"),
                attribute(nova, n + "owner/" + n + "user", "uuid"),
                element_text(nova, n + "owner/" + n + "user"),
                attribute(nova, n + "flavor", "name"),
                attribute(nova, n + "root", "type"), attribute(nova, n + "root", "uuid"))]
            break
    metadata = root.find("metadata")
    if metadata_labels and metadata is not None:
        picked = tuple(pick(metadata, path) for _, path in metadata_labels)
        if any(picked):
            info["vm_metadata_info"] = [picked]
    info["vm_disk_info"] = [(
        attribute(disk, "target", "dev"), disk.get("type"), disk_source(disk),
        attribute(disk, "target", "bus"), attribute(disk, "driver", "type"),
        attribute(disk, "driver", "cache"), element_text(disk, "serial"),
        "true" if disk.find("readonly") is not None else "false")
        for disk in root.findall("devices/disk")]
    info["vm_network_info"] = [(
        attribute(nic, "target", "dev") or attribute(nic, "mac", "address"),
        attribute(nic, "mac", "address"), nic.get("type"), nic_source(nic),
        attribute(nic, "model", "type"), attribute(nic, "mtu", "size"),
        attribute(nic, "virtualport/parameters", "interfaceid"))
        for nic in root.findall("devices/interface")]
    return dict((family, [tuple(label_value(v) for v in labels) for labels in rows])
                for family, rows in info.items())


def pick(metadata, path):
    """The text or attribute PATH (ElementTree syntax, '@name' at the end) finds below <metadata>."""
    path, _, name = path.partition("@")
    found = metadata.find(path) if path else metadata
    if found is None:
        return None
    return found.get(name) if name else found.text


def metadata_label(text):
    """--metadata-label LABEL=PATH, checked: (label, path)."""
    label, sep, path = text.partition("=")
    if not sep or not LABEL_NAME_RE.match(label) or label.startswith("__") \
            or label in ("uuid", "name"):
        raise argparse.ArgumentTypeError(
            "%r: use LABEL=PATH, LABEL a Prometheus label name other than uuid and name" % text)
    try:
        ElementTree.Element("metadata").find(path.partition("@")[0] or ".")
    except (SyntaxError, KeyError, TypeError, ValueError, IndexError):
        raise argparse.ArgumentTypeError("%r: PATH is not a valid ElementTree path" % text)
    if not path or path.endswith("@") or path.count("@") > 1:
        raise argparse.ArgumentTypeError("%r: PATH names nothing" % text)
    return label, path


# =============================================================================
# Event hub: history and live streams
# =============================================================================

EVENT_FILTERS = dict((name.lower() + "_events", name) for name in ALL_EVENT_TYPES)


def disk_target(spec, alias):
    """The target name (vda) of the disk whose alias (virtio-disk0) an event gives."""
    for device in (spec or {}).get("devices", ()):
        if device.get("family") == "disk" and (device.get("alias") or {}).get("name") == alias:
            target = (device.get("target") or {}).get("dev")
            return target if isinstance(target, str) else None
    return None


class Event(object):
    """A domain event with its JSON line encoded once for every client.  Lifecycle
    events have no details (their JSON is the original vAdvisor's)."""

    __slots__ = ("id", "ms", "type", "json")

    def __init__(self, event_id, when, name, uuid, event_type, reason, details=None):
        # Time in whole milliseconds, as its timestamp shows it, so that a
        # timestamp read from an event is an exact start_time or end_time bound.
        self.id, self.ms, self.type = event_id, int(when * 1000), event_type
        fields = [("id", event_id), ("domain_name", name), ("domain_id", uuid),
                  ("timestamp", rfc3339_ms(self.ms)), ("event_type", event_type),
                  ("reason", reason)]
        if details is not None:
            fields.append(("details", details))
        self.json = json.dumps(collections.OrderedDict(fields))


class EventFilter(object):
    """Which events a query or stream wants: types, a time window, ids after since."""

    def __init__(self, only=None, excluded=(), start=None, end=None, since=None):
        self.only, self.excluded = only, frozenset(excluded)
        self.start = None if start is None else int(round(start * 1000))
        self.end = None if end is None else int(round(end * 1000))
        self.since = since

    def __call__(self, event):
        if self.only is not None and event.type not in self.only:
            return False
        if event.type in self.excluded:
            return False
        if self.since is not None and event.id <= self.since:
            return False
        if self.start is not None and event.ms < self.start:
            return False
        return self.end is None or event.ms <= self.end


class Subscription(object):
    """One stream client's bounded queue.  Guarded by the hub's lock."""

    def __init__(self, lock, wanted, limit):
        self.wanted, self.limit = wanted, limit
        self.queue = collections.deque()
        self.overflowed = False
        self.ready = threading.Condition(lock)

    def offer(self, event):
        if self.overflowed or not self.wanted(event):
            return
        if len(self.queue) >= self.limit:
            self.overflowed = True   # the client gets a gap marker, never silent loss
        else:
            self.queue.append(event)
        self.ready.notify()


class EventHub(object):
    """History in a bounded deque plus live subscribers.

    publish() runs on libvirt's event-loop thread: it only appends and
    notifies, so a slow client can never hold up the event loop.
    """

    def __init__(self, max_events=10000, max_age=86400, max_streams=100, queue_limit=1000):
        self.lock = threading.Lock()
        # One bounded deque per event type: a chatty kind (a guest's RTC changes,
        # balloon changes) pushes out only its own history, never lifecycle events.
        self.max_events = max_events
        self.kinds = {}         # event_type -> deque of Events, oldest first
        self.kept = 0           # events in all the deques
        self.max_age = max_age
        self.max_streams = max_streams
        self.queue_limit = queue_limit
        self.subscribers = []
        self.last_id = 0
        self.counts = dict((name, 0) for name in ALL_EVENT_TYPES + ("Unknown",))
        self.closing = False

    def publish(self, name, uuid, event, detail):
        """A lifecycle event, from its codes."""
        event_type, reason = event_names(event, detail)
        return self.record(name, uuid, event_type, reason)

    def record(self, name, uuid, event_type, reason, details=None):
        """Any event: kept, counted by type and offered to every stream (what it
        means for its domain, its record keeps: see main).

        At --event-history events in all, the kind with the most events gives up
        its oldest: a chatty kind pushes out its own history, not another's."""
        now = time.time()
        with self.lock:
            self.last_id += 1
            item = Event(self.last_id, now, name, uuid, event_type, reason, details)
            kind = self.kinds.get(event_type)
            if kind is None:
                kind = self.kinds[event_type] = collections.deque()
            kind.append(item)
            self.kept += 1
            if self.kept > self.max_events:
                max(self.kinds.values(), key=len).popleft()
                self.kept -= 1
            self._expire(now)
            self.counts[event_type] = self.counts.get(event_type, 0) + 1
            for subscriber in self.subscribers:
                subscriber.offer(item)
        log.debug("event %s", item.json)
        return item

    def resume_point(self, since):
        """The id to resume after: an id beyond the newest is from before the agent
        restarted (ids start again), so everything kept follows it."""
        return 0 if since > self.last_id else since

    def _expire(self, now):
        horizon = (now - self.max_age) * 1000
        for kind in self.kinds.values():
            while kind and kind[0].ms < horizon:
                kind.popleft()
                self.kept -= 1

    def snapshot(self):
        """The deques' contents, copied: called with the lock held; merge() them
        outside it, so the event-loop thread waits for a copy, not a sort."""
        return [list(kind) for kind in self.kinds.values()]

    @staticmethod
    def merge(copies):
        """Every event of snapshot(), oldest first."""
        return heapq.merge(*copies, key=lambda e: e.id)

    def history(self, wanted, limit):
        """The oldest `limit` matching events (-1: all), oldest first."""
        with self.lock:
            self._expire(time.time())
            copies = self.snapshot()
        found = []
        for item in self.merge(copies):
            if wanted(item):
                found.append(item)
                if len(found) == limit:
                    break
        return found

    def subscribe(self, wanted, replay):
        """(subscription, events to replay first), or None when at --max-streams.

        Registering and taking the replay happen under one lock, so no event
        falls between the two and none comes twice.
        """
        with self.lock:
            if self.closing or len(self.subscribers) >= self.max_streams:
                return None
            subscription = Subscription(self.lock, wanted, self.queue_limit)
            backlog = [e for e in self.merge(self.snapshot()) if replay(e)] if replay else []
            self.subscribers.append(subscription)
        return subscription, backlog

    def unsubscribe(self, subscription):
        with self.lock:
            if subscription in self.subscribers:
                self.subscribers.remove(subscription)

    def next(self, subscription, timeout):
        """(events, overflowed, closing) once something happens or timeout passes."""
        with self.lock:
            if not subscription.queue and not subscription.overflowed and not self.closing:
                subscription.ready.wait(timeout)
            batch = list(subscription.queue)
            subscription.queue.clear()
            return batch, subscription.overflowed, self.closing

    def streams(self):
        with self.lock:
            return len(self.subscribers)

    def close(self):
        """Ends every stream (shutdown)."""
        with self.lock:
            self.closing = True
            for subscription in self.subscribers:
                subscription.ready.notify()


# =============================================================================
# HTTP: the agent, the routes, the handler, the server
# =============================================================================

class Memo(object):
    """Bodies made once per key and shared by every request that asks while the key
    lasts (the page: always; the overview: a sample; /metrics: a sample and the
    specs and events it shows, in each format); the newest few keys are kept."""

    def __init__(self, keep=8):
        self.keep = keep
        self.made = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key, make):
        with self.lock:     # concurrent requests make a body once
            body = self.made.get(key)
            if body is None:
                body = self.made[key] = make()
                while len(self.made) > self.keep:
                    self.made.popitem(last=False)
            return body


class Agent(object):
    """What the routes need, wired together by main(): the connection, the
    sampling loop and its parts, the store, the formatters, the event hub and
    StatsD."""

    def __init__(self, args, hypervisor, call, store, registry, loop, specs, hub=None,
                 statsd=None, users=None):
        self.args, self.hypervisor, self.call, self.store = args, hypervisor, call, store
        self.registry, self.loop, self.specs, self.hub = registry, loop, specs, hub
        self.sampler = loop.sampler
        self.statsd, self.users = statsd, users
        self.exposition = Exposition(registry)
        self.overview = Overview(registry)
        # one per kind of body, so that rendering one never waits for another
        self.metrics_memo, self.overview_memo, self.page_memo = Memo(), Memo(2), Memo(1)
        self.started = time.time()
        self.build_labels = (("version", VERSION), ("python_version", platform.python_version()),
                             ("libvirt_version", libvirt_version_string()))

    def metrics_body(self, openmetrics, want_gzip):
        """The /metrics body, as parts to send one after the other: the sample's part
        is rendered (and compressed) once, the agent's own families every scrape.

        For gzip the memo holds a compressor that has consumed the sample's part;
        each scrape copies it and adds the rest, so the answer is one gzip stream
        for the price of compressing a few lines."""
        sample, store = self.loop.latest, self.store

        def make():
            text = self.exposition.domains(sample, store, openmetrics).encode("utf-8")
            if not want_gzip:
                return text
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
            return compressor.compress(text), compressor
        body = self.metrics_memo.get((sample.seq, store.info_version, store.events_version,
                                      openmetrics, want_gzip), make)
        tail = (self.exposition.own(self, sample, time.time(), openmetrics)
                + ("# EOF\n" if openmetrics else "")).encode("utf-8")
        if not want_gzip:
            return body, tail
        head, compressor = body
        compressor = compressor.copy()
        return head, compressor.compress(tail) + compressor.flush()

    def overview_body(self):
        """The overview document's JSON, once per sample."""
        with self.loop.new_sample:
            sample, previous = self.loop.latest, self.loop.previous
        return self.overview_memo.get(sample.seq, lambda: self.overview.body(
            sample, previous, self.store, self.args.interval))

    def page(self):
        return self.page_memo.get("page", lambda: page_html(
            VERSION, self.hypervisor.uri, chart_spec(self.registry)).encode("utf-8"))

    def fresh_sample(self, started_after=False):
        sample = self.loop.fresh_sample(self.live_timeout(), started_after)
        if sample is None:
            raise HTTPError(503, "no fresh sample: libvirt at %s is unreachable or too slow (%s)"
                            % (self.hypervisor.uri, self.hypervisor.error or "timeout"))
        return sample

    def live_timeout(self):
        return max(10.0, 2 * self.args.interval)

    def status_what(self):
        """What the STATUS line says, but the sample's age."""
        return (len(self.loop.latest.domains), bool(self.loop.latest.time), self.hypervisor.up)

    def status(self):
        """One line for systemd's STATUS=."""
        sample = self.loop.latest
        age = "%.1f s" % (time.time() - sample.time) if sample.time else "none yet"
        return "%d domains, last sample %s ago, libvirt %s" % (
            len(sample.domains), age, "connected" if self.hypervisor.up else "unreachable")

    def source(self, sample):
        """Where the fast tier's values come from, for /healthz."""
        kernel = self.sampler.kernel
        active = sum(1 for _, _, stats in sample.domains
                     if stats.get("state.state") not in INACTIVE_STATES)
        unavailable = kernel.reason if kernel is not None else "--source libvirt"
        return {"configured": self.args.source,
                "kernel_domains": sample.kernel_domains,
                "libvirt_domains": active - sample.kernel_domains,
                "libvirt_values": sample.through_libvirt,
                "libvirt_why": None if unavailable else self.why_libvirt(),
                "kernel_unavailable": unavailable,
                "pressure_unavailable": unavailable or self.no_pressure(),
                "interval_seconds": self.args.interval,
                "full_interval_seconds": self.loop.pacer.full_interval}

    def why_libvirt(self):
        """Why the kernel did not give running domains' values, or None."""
        why = [r.why_libvirt for r in self.store.present_records() if r.why_libvirt]
        return "%d domain(s): %s" % (len(why), why[0]) if why else None

    def no_pressure(self):
        """Why the pressure families lack for running domains the kernel reads, or None."""
        why = [r.process.no_pressure for r in self.store.present_records()
               if r.process is not None and r.process.pressure is None]
        return "%d domain(s): %s" % (len(why), why[0]) if why else None

    def health(self):
        sample = self.loop.latest
        age = time.time() - sample.time if sample.time else None
        fresh = age is not None and age <= max(3 * self.args.interval, 10)
        ok = self.hypervisor.up and fresh
        return ok, {
            "status": "ok" if ok else "degraded",
            "version": VERSION,
            "libvirt": {"uri": self.hypervisor.uri, "connected": self.hypervisor.up,
                        "error": None if self.hypervisor.up else self.hypervisor.error},
            "sample_age_seconds": None if age is None else round(age, 3),
            "sample_duration_seconds": round(sample.duration, 6),
            "source": self.source(sample),
            "domains": len(sample.domains),
            "uptime_seconds": round(time.time() - self.started, 3),
        }


def stats_text(domains):
    """{"uuid": [sample, ...], ...} from rendered samples; None when there are none.

    uuids come from libvirt as hex and dashes, so they need no JSON escaping.
    """
    parts = ['"%s":[%s]' % (uuid, ",".join(samples)) for uuid, samples in domains]
    return "{%s}" % ",".join(parts) if parts else None


class HTTPError(Exception):
    def __init__(self, status, message, headers=()):
        Exception.__init__(self, message)
        self.status, self.message, self.headers = status, message, headers


def parse_query(query, parsers, patterns=()):
    """{name: parsed value}; any unknown, repeated or unparsable parameter is a 400."""
    pairs = parse_qsl(query, keep_blank_values=True)    # 'a' alone reads as a=''
    params = {}
    for name, text in pairs:
        parser = parsers.get(name) or next((p for k, p in patterns if k(name)), None)
        if parser is None:
            raise HTTPError(400, "unknown parameter %r; known: %s"
                            % (name, ", ".join(sorted(parsers)) or "none"))
        if name in params:
            raise HTTPError(400, "parameter %r given twice" % name)
        try:
            params[name] = parser(text)
        except ValueError as exc:
            raise HTTPError(400, "parameter %r: %s" % (name, exc))
    return params


def boolean(text):
    word = text.lower()
    if word not in ("true", "false"):
        raise ValueError("%r is not true or false" % text)
    return word == "true"


def event_count(text):
    value = int(text)
    if value < -1:
        raise ValueError("must be -1 (all) or a count of 0 or more")
    return value


def event_id(text):
    value = int(text)
    if value < 0:
        raise ValueError("must be an event id of 0 or more")
    return value


ISO_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?"
    r"\s*(Z|z|[+-]\d{2}:?\d{2})?$")


def iso_time(text):
    """RFC 3339 / ISO 8601 to Unix time; without a zone it is UTC."""
    m = ISO_TIME_RE.match(text.strip())
    if m is None:
        raise ValueError("%r is not an ISO 8601 time such as 2024-05-01T12:00:00Z" % text)
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    try:
        moment = datetime.datetime(int(year), int(month), int(day), int(hour or 0),
                                   int(minute or 0), int(second or 0))
    except ValueError as exc:
        raise ValueError("%r: %s" % (text, exc))
    offset = 0
    if zone and zone not in "Zz":
        digits = zone[1:].replace(":", "")
        offset = (int(digits[:2]) * 60 + int(digits[2:])) * 60 * (1 if zone[0] == "+" else -1)
    epoch = (moment - datetime.datetime(1970, 1, 1)).total_seconds() - offset
    return epoch + (float("0." + fraction) if fraction else 0.0)


def canonical_uuid(text):
    if not UUID_RE.match(text):
        return None
    digits = text.replace("-", "").lower()
    return "-".join((digits[:8], digits[8:12], digits[12:16], digits[16:20], digits[20:]))


# -- the routes -----------------------------------------------------------------------
#
# A route's handler gets the request (the Handler: its agent, its headers) and the
# checked query parameters, then the path's <segments>; it returns (status,
# content type, body, headers), or None once it has answered itself (a stream).

def json_body(obj):
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8")


HTML_TYPE = "text/html; charset=utf-8"


def serve_page(request, params):
    return 200, HTML_TYPE, request.agent.page(), PAGE_HEADERS


def serve_overview(request, params):
    return 200, "application/json", request.agent.overview_body(), ()


def serve_metrics(request, params):
    openmetrics = "application/openmetrics-text" in request.headers.get("Accept", "")
    want_gzip = "gzip" in request.headers.get("Accept-Encoding", "")
    body = request.agent.metrics_body(openmetrics, want_gzip)
    headers = [("Content-Encoding", "gzip")] if want_gzip else []
    headers.append(("Vary", "Accept, Accept-Encoding"))
    return 200, OPENMETRICS_TYPE if openmetrics else PROMETHEUS_TYPE, body, headers


def serve_health(request, params):
    ok, state = request.agent.health()
    return 200 if ok else 503, "application/json", json_body(state), ()


def serve_stats(request, params, key=None):
    """{uuid: [sample, ...]} from the history, oldest first; with live=true one fresh
    sample per domain (concurrent callers share one libvirt call)."""
    agent = request.agent
    uuid = None
    if key is not None:
        uuid = canonical_uuid(unquote(key))
        if uuid is None:
            raise HTTPError(404, "not a domain uuid: %r" % unquote(key))
    history = agent.loop.history
    if params.get("live"):
        sample = agent.fresh_sample()
        text = stats_text((u, [history.render(sample.time, *history.compact(st))])
                          for u, _name, st in sample.domains if uuid is None or u == uuid)
    else:
        text = stats_text((u, [history.render(*record) for record in records])
                          for u, records in history.get(uuid).items())
    if text is None and uuid is not None:
        raise HTTPError(404, "no stats for domain %s" % uuid)
    return 200, "application/json", (text or "{}").encode("utf-8") + b"\n", ()


def serve_specs(request, params, key=None):
    """Every domain's spec, or one by uuid or name; a miss waits for one fresh sample."""
    agent = request.agent
    if key is None:
        return 200, "application/json", json_body(agent.specs.all()), ()
    key = unquote(key)
    spec = agent.specs.get(key)
    if spec is None:
        sample = agent.fresh_sample(started_after=True)
        spec = agent.specs.get(key, sample.seq, agent.live_timeout())
    if spec is None:
        raise HTTPError(404, "no domain with uuid or name %r" % key)
    return 200, "application/json", json_body(spec), ()


EVENT_PARAMS = dict([("stream", boolean), ("start_time", iso_time), ("end_time", iso_time),
                     ("max_events", event_count), ("all_events", boolean),
                     ("since", event_id)] + [(name, boolean) for name in EVENT_FILTERS])


def serve_events(request, params):
    """History (newline-delimited JSON), or a live stream (NDJSON or SSE) that
    replays from since= (or Last-Event-ID) or start_time= first."""
    hub = request.agent.hub
    sse = "text/event-stream" in request.headers.get("Accept", "")
    streaming = params.get("stream", sse)
    since = resume_after(request, params, streaming)
    selected = set(t for n, t in EVENT_FILTERS.items() if params.get(n) is True)
    excluded = set(t for n, t in EVENT_FILTERS.items() if params.get(n) is False)
    only = selected if selected and not params.get("all_events") else None
    if not streaming:
        wanted = EventFilter(only, excluded, params.get("start_time"),
                             params.get("end_time"), since)
        found = hub.history(wanted, params.get("max_events", 10))
        return 200, "application/x-ndjson", "".join(e.json + "\n" for e in found).encode(), ()
    for name in ("end_time", "max_events"):
        if name in params:
            raise HTTPError(400, "parameter %r does not apply to stream=true" % name)
    replay = None
    if since is not None or "start_time" in params:
        replay = EventFilter(only, excluded, params.get("start_time"), None, since)
    request.stream_events(EventFilter(only, excluded), replay, sse, since or 0)
    return None


def resume_after(request, params, streaming):
    """The event id to resume after: since=, else (a stream's) Last-Event-ID, by the
    hub's resume rule; None for neither."""
    since = params.get("since")
    if since is None and streaming and request.headers.get("Last-Event-ID"):
        try:
            since = event_id(request.headers["Last-Event-ID"].strip())
        except ValueError:
            raise HTTPError(400, "header Last-Event-ID must be an event id")
    return None if since is None else request.agent.hub.resume_point(since)


class Route(object):
    """One endpoint: its path as the README documents it ('<name>' stands for a
    path segment, handed to the handler; slash: a trailing '/' may be there or
    not), its handler, the query parameters it takes (name -> parser: any other
    is a 400), the content types it answers with (besides a JSON error), its
    Cache-Control, and whether the page's header links it."""

    def __init__(self, path, handler, types, params=None, cache=None, link=False,
                 slash=False):
        self.path, self.handler, self.types, self.params = path, handler, types, params or {}
        self.cache, self.link = cache, link
        literal = path.rstrip("/") if slash else path
        pattern = "([^/]+)".join(re.escape(part) for part in re.split(r"<[^>]+>", literal))
        self.regex = re.compile("^%s%s$" % (pattern, "/?" if slash else ""))


JSON = ("application/json",)
ROUTES = (
    Route("/", serve_page, (HTML_TYPE,), cache="no-cache"),
    Route("/ui", serve_page, (HTML_TYPE,), cache="no-cache"),
    Route("/metrics", serve_metrics, (PROMETHEUS_TYPE, OPENMETRICS_TYPE), link=True),
    Route("/healthz", serve_health, JSON, link=True),
    Route("/api/v1.0/stats/", serve_stats, JSON, {"live": boolean}, slash=True, link=True),
    Route("/api/v1.0/stats/<uuid>", serve_stats, JSON, {"live": boolean}),
    Route("/api/v1.0/specs/", serve_specs, JSON, slash=True, link=True),
    Route("/api/v1.0/specs/<uuid-or-name>", serve_specs, JSON),
    Route("/api/v1.0/events", serve_events, ("application/x-ndjson", "text/event-stream"),
          EVENT_PARAMS, slash=True, link=True),
    Route("/api/v1.0/overview", serve_overview, JSON, cache="no-store", slash=True, link=True),
)


def find_route(path):
    """(route, its path segments) of a request's path; a 404 for none."""
    for route in ROUTES:
        match = route.regex.match(path)
        if match:
            return route, match.groups()
    raise HTTPError(404, "no such endpoint: %s" % path)


class Handler(BaseHTTPRequestHandler):
    """HTTP plumbing: every request goes to its route (find_route), with the same
    checks for all: no body, the credentials, the query parameters."""

    server_version = "vadvisor/" + VERSION
    protocol_version = "HTTP/1.1"
    timeout = 10                # a client that connects and sends nothing is dropped
    agent = None                # set on the subclass main() builds

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), escape_controls(fmt % args))

    def log_request(self, code="-", size="-"):
        log.debug("%s \"%s\" %s %s", self.address_string(),
                  escape_controls(getattr(self, "requestline", "")), code, size)

    def send_error(self, code, message=None, explain=None):
        """Errors found by BaseHTTPRequestHandler itself, answered as JSON."""
        self.close_connection = True
        try:
            self.send_body(code, "application/json",
                           json_body({"error": message or self.responses.get(code, ("",))[0]}))
        except OSError:
            pass

    def setup(self):
        BaseHTTPRequestHandler.setup(self)
        self.answered = False
        # Headers and body go out in two writes: without this, a keep-alive client's
        # delayed ACK holds the body back some 40 ms (Nagle's algorithm).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(self.connection, "do_handshake"):
            self.connection.do_handshake()  # TLS, here under this connection's timeout

    def send_response(self, code, message=None):
        self.answered = True
        BaseHTTPRequestHandler.send_response(self, code, message)

    def do_GET(self):
        try:
            self.refuse_body()
            self.check_auth()
            self.answer()
        except HTTPError as err:
            self.send_body(err.status, "application/json", json_body({"error": err.message}),
                           err.headers)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as exc:    # a bug: say so, keep the worker
            log.warning("%s %s failed: %r", self.command, escape_controls(self.path), exc)
            log.debug("details", exc_info=True)
            self.close_connection = True
            if not self.answered:
                self.send_body(500, "application/json",
                               json_body({"error": "internal error; see the agent's log"}))

    do_HEAD = do_GET

    def answer(self):
        path, query = split_target(self.path)
        route, segments = find_route(path)
        answer = route.handler(self, parse_query(query, route.params), *segments)
        if answer is not None:
            status, content_type, body, headers = answer
            assert content_type in route.types, (route.path, content_type)
            if route.cache:
                headers = tuple(headers) + (("Cache-Control", route.cache),)
            self.send_body(status, content_type, body, headers)

    def send_body(self, status, content_type, body, headers=()):
        """body: bytes, or a tuple of bytes written one after the other (a shared
        cached part is sent as it is, never copied into a new body)."""
        parts = body if isinstance(body, tuple) else (body,)
        if self.request_version == "HTTP/0.9":  # errors found before the version was read
            self.request_version = "HTTP/1.0"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(sum(len(part) for part in parts)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            for part in parts:
                self.wfile.write(part)

    def refuse_method(self):
        self.close_connection = True    # its body, if any, is not read
        self.send_body(405, "application/json",
                       json_body({"error": "method %s not allowed" % self.command}),
                       [("Allow", "GET, HEAD")])

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = refuse_method

    def refuse_body(self):
        """A body on GET would be read as the next request: refuse it and close.

        Also refuses a header block the parser could only half read (a line
        without a colon ends it early, silently dropping what follows)."""
        if getattr(self.headers, "defects", None):
            self.close_connection = True
            raise HTTPError(400, "malformed header line")
        length = self.headers.get("Content-Length", "0").strip()
        if length not in ("", "0") or "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise HTTPError(400, "%s takes no request body" % self.command)

    def check_auth(self):
        users = self.agent.users
        if users is None or (self.agent.args.open_healthz and
                             split_target(self.path)[0] == "/healthz"):
            return
        if not users.check(self.headers.get("Authorization", "")):
            raise HTTPError(401, "authentication required",
                            [("WWW-Authenticate", 'Basic realm="vadvisor", charset="UTF-8"')])

    def stream_events(self, wanted, replay, sse, last):
        """Writes events as they come, one line (or SSE message) each, flushed at once."""
        hub = self.agent.hub
        found = hub.subscribe(wanted, replay)
        if found is None:
            raise HTTPError(503, "too many event streams (--max-streams %d)" % hub.max_streams)
        subscription, backlog = found
        self.close_connection = True
        # A small kernel buffer, so that a slow client backs up into its
        # bounded queue (and gets the gap marker) instead of into megabytes
        # of socket memory.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
        try:
            chunked = self.request_version == "HTTP/1.1"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream" if sse else "application/x-ndjson")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding" if chunked else "Connection",
                             "chunked" if chunked else "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            send = self.chunk_sender(chunked)
            send(format_events(backlog, sse))
            last = backlog[-1].id if backlog else last
            while True:
                batch, overflowed, closing = hub.next(subscription, self.agent.args.stream_keepalive)
                if batch:
                    send(format_events(batch, sse))
                    last = batch[-1].id
                if overflowed:
                    send(gap_marker(last, sse))
                    break
                if closing:
                    break
                if not batch:
                    send(": keep-alive\n\n" if sse else "\n")
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (ConnectionError, socket.timeout):
            log.debug("event stream client %s went away", self.address_string())
        finally:
            hub.unsubscribe(subscription)

    def chunk_sender(self, chunked):
        def send(text):
            if text:
                data = text.encode("utf-8")
                if chunked:
                    data = b"%x\r\n%s\r\n" % (len(data), data)
                self.wfile.write(data)
        return send


def split_target(target):
    """(path, query) of a request target; '//x' is a path, not a host."""
    if target.startswith(("http://", "https://")):  # absolute form
        url = urlsplit(target)
        return url.path or "/", url.query
    path, _, query = target.partition("?")
    return path.partition("#")[0], query


def format_events(events, sse):
    if sse:
        return "".join("id: %d\ndata: %s\n\n" % (e.id, e.json) for e in events)
    return "".join(e.json + "\n" for e in events)


def gap_marker(last_id, sse):
    """What a client too slow to keep up gets before its stream is closed."""
    text = json.dumps({"gap": True, "last_id": last_id,
                       "error": "client too slow: events after id %d were dropped; "
                                "reconnect with since=%d" % (last_id, last_id)})
    return "event: gap\ndata: %s\n\n" % text if sse else text + "\n"


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer plus dual-stack binding, TLS and a connection cap."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    tls = None                  # an ssl.SSLContext for HTTPS
    max_connections = 400

    def __init__(self, address, handler):
        self.active = 0
        self.active_lock = threading.Lock()
        ThreadingHTTPServer.__init__(self, address, handler)

    def get_request(self):
        sock, address = self.socket.accept()
        if self.tls is not None:    # the handshake happens in the connection's thread
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request, client_address):
        with self.active_lock:
            full = self.active >= self.max_connections
            if not full:
                self.active += 1
        if full:
            return self.refuse(request)
        try:
            ThreadingHTTPServer.process_request(self, request, client_address)
        except Exception:
            self.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            ThreadingHTTPServer.process_request_thread(self, request, client_address)
        finally:
            self.release()

    def release(self):
        with self.active_lock:
            self.active -= 1

    def refuse(self, request):
        """Past --max-connections: a 503 from the accept loop, no thread spent."""
        if self.tls is None:
            body = b'{"error":"too many connections (--max-connections %d)"}\n' % self.max_connections
            try:
                request.settimeout(0.5)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                                b"\r\nContent-Length: %d\r\nRetry-After: 1\r\nConnection: close"
                                b"\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
        self.shutdown_request(request)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            try:  # one socket for IPv4 and IPv6
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        # HTTPServer.server_bind would look up our own name in DNS; skip that.
        import socketserver
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):    # gone, timed out, or a failed TLS handshake
            log.debug("client %s went away: %s", client_address[0], exc)
        else:
            log.warning("request from %s failed: %r", client_address[0], exc)


def make_server(listen, port, handler, tls=None, max_connections=400):
    """A server on ADDR:PORT; the default '' means every IPv4 and IPv6 address."""
    def server(family, host):
        settings = {"address_family": family, "tls": tls, "max_connections": max_connections}
        return type("AgentServer", (Server,), settings)((host, port), handler)
    if listen in ("", "::"):
        try:
            return server(socket.AF_INET6, "::")
        except OSError:  # no IPv6 on this host
            return server(socket.AF_INET, "0.0.0.0")
    return server(socket.AF_INET6 if ":" in listen else socket.AF_INET, listen.strip("[]"))


def tls_context(cert, key):
    """HTTPS with TLS 1.2 or newer.  ssl is imported here: it costs a few MB
    of memory that an agent without --tls-cert need not pay."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if hasattr(ssl, "TLSVersion"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # novermin: guarded; 3.6 below
    else:
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    context.load_cert_chain(cert, key)
    return context


# -- Basic auth ------------------------------------------------------------------

HASH_SCHEME = "pbkdf2_sha256"
HASH_ITERATIONS = 200000


def hash_password(password, salt=None, iterations=HASH_ITERATIONS):
    """'pbkdf2_sha256$<iterations>$<salt>$<digest>', salt and digest in base64."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return "%s$%d$%s$%s" % (HASH_SCHEME, iterations, base64.b64encode(salt).decode(),
                            base64.b64encode(digest).decode())


def parse_hash(text):
    scheme, iterations, salt, digest = text.split("$")
    if scheme != HASH_SCHEME or not iterations.isdigit():
        raise ValueError("not a %s hash" % HASH_SCHEME)
    return int(iterations), base64.b64decode(salt, validate=True), \
        base64.b64decode(digest, validate=True)


class Users(object):
    """--basic-auth-file: lines 'user:hash' made by --hash-password.

    Every check costs one PBKDF2, known user or not, and compares in
    constant time, so an answer never tells whether a user exists.  Headers
    that passed are remembered (as SHA-256 digests) for a few minutes, so a
    scraper does not pay PBKDF2 on every scrape.
    """

    REMEMBER_SECONDS = 300

    def __init__(self, path):
        self.users = {}
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                user, _, stored = line.partition(":")
                try:
                    self.users[user] = parse_hash(stored)
                except (ValueError, TypeError):
                    raise ValueError("%s line %d: expected user:%s$..., as --hash-password "
                                     "writes it" % (path, number, HASH_SCHEME))
        if not self.users:
            raise ValueError("%s names no user" % path)
        self.dummy = parse_hash(hash_password("", iterations=HASH_ITERATIONS))
        self.passed = {}        # sha256(header) -> when it passed
        self.lock = threading.Lock()

    def check(self, header):
        key = hashlib.sha256(header.encode("utf-8", "replace")).digest()
        now = time.monotonic()
        with self.lock:
            if now - self.passed.get(key, -1e9) < self.REMEMBER_SECONDS:
                return True
        user, password = basic_credentials(header)
        iterations, salt, digest = self.users.get(user, self.dummy)
        computed = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8", "replace"), salt,
                                       iterations)
        ok = hmac.compare_digest(computed, digest) and user in self.users
        if ok:
            with self.lock:
                if len(self.passed) > 10000:
                    self.passed.clear()
                self.passed[key] = now
        return ok


def basic_credentials(header):
    """(user, password) from an Authorization header; ('', '') when there are none."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode(
            "utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return "", ""
    return user, password


# =============================================================================
# systemd notify
# =============================================================================

class SystemdNotifier(object):
    """sd_notify(3) for Type=notify: one datagram per message to $NOTIFY_SOCKET.

    Silent when systemd did not start us.  WATCHDOG=1 goes out at half of
    $WATCHDOG_USEC from the sampling loop, so a hung libvirt trips it.  STATUS goes
    with each beat, every 10 s at least, and within a second of a change of what
    it says: `systemctl status` is never half a watchdog period behind.
    """

    STATUS_EVERY = 10.0

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):     # the abstract namespace
            address = "\0" + address[1:]
        self.address = address or None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        self.every = 10.0               # STATUS only, without a watchdog
        self.watchdog = usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid()))
        if self.watchdog:
            self.every = int(usec) / 2e6
        self.last = self.told_at = 0.0
        self.told = None        # what the last STATUS said, but its sample's age
        self.sock = None
        self.failed = False

    def send(self, *messages):
        if self.address is None:
            return
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # The sampler sends the beats: a reader that falls behind
                # (a full queue) costs a beat, never a stalled sampler.
                self.sock.setblocking(False)
            self.sock.sendto("\n".join(messages).encode("utf-8"), self.address)
        except OSError as exc:
            (log.debug if self.failed else log.warning)(
                "systemd notify to %r failed: %s (later failures are logged with -v)",
                self.address.replace("\0", "@"), exc)
            self.failed = True

    def ready(self, status):
        self.send("READY=1", "STATUS=" + status)

    def beat(self, status, what=lambda: None):
        """WATCHDOG=1 (when asked for) every half watchdog period; STATUS (the line
        status() makes) with it, and on its own when what() changed (the first
        sample, libvirt lost or back, domains come or go) or 10 s passed."""
        if self.address is None:
            return
        now = time.monotonic()
        messages = []
        if self.watchdog and now - self.last >= self.every:
            self.last = now
            messages.append("WATCHDOG=1")
        since = now - self.told_at
        if messages or since >= self.STATUS_EVERY or since >= 1 and what() != self.told:
            self.told_at, self.told = now, what()
            self.send(*messages + ["STATUS=" + status()])

    def stopping(self):
        self.send("STOPPING=1", "STATUS=stopping")


# =============================================================================
# Command line and main()
# =============================================================================

class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag told in one line (not the whole usage) and exit code 2."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    labels = [label for label, _ in args.metadata_label]
    if len(set(labels)) != len(labels):
        build_parser().error("argument --metadata-label: a label name is given twice: %s"
                             % ", ".join(sorted(set(l for l in labels if labels.count(l) > 1))))
    return args


def build_parser():
    p = ArgumentParser(
        prog="vadvisor", description="Read-only monitoring agent for KVM/libvirt hypervisors.")
    p.add_argument("--connect", metavar="URI", default="qemu:///system",
                   help="libvirt URI, always opened read-only (default: %(default)s)")
    p.add_argument("--listen", metavar="ADDR", default="",
                   help="address to listen on (default: every IPv4 and IPv6 address)")
    p.add_argument("--port", type=port_number, default=8181,
                   help="HTTP port (default: %(default)s)")
    p.add_argument("--interval", type=positive_float, default=1.0, metavar="SECONDS",
                   help="sampling period of the fast tier: state, CPU, vCPU, memory RSS and "
                        "network (default: %(default)s)")
    p.add_argument("--full-interval", type=positive_float, default=15.0, metavar="SECONDS",
                   help="period of the full libvirt sample, every group; at least --interval "
                        "(default: %(default)s)")
    p.add_argument("--source", choices=SOURCES, default="auto",
                   help="where the fast tier reads from: auto, the host kernel where it can; "
                        "libvirt, libvirt only (default: %(default)s)")
    p.add_argument("--history", type=positive_float, default=60.0, metavar="SECONDS",
                   help="how long the JSON API keeps samples (default: %(default)s)")
    p.add_argument("--down-minutes", type=non_negative_float, default=10.0, metavar="M",
                   help="how long a vanished domain keeps vm_up 0 (default: %(default)s)")
    p.add_argument("--libvirt-timeout", type=positive_float, default=5.0, metavar="SECONDS",
                   help="give up waiting for a libvirt call after this long (default: %(default)s)")
    p.add_argument("--collect", type=collect_groups, default=(), metavar="GROUPS",
                   help="extra stat groups, comma-separated: %s, or all" % ",".join(OPTIONAL_GROUPS))
    p.add_argument("--metadata-label", type=metadata_label, action="append", default=[],
                   metavar="LABEL=PATH",
                   help="a vm_metadata_info label from the domain's <metadata>: PATH is an "
                        "ElementTree path below it ({namespace}tag, optional @attribute at the "
                        "end); repeatable")
    p.add_argument("--event-history", type=positive_int, default=10000, metavar="N",
                   help="events kept for /api/v1.0/events; when full, the event type with the "
                        "most gives up its oldest (default: %(default)s)")
    p.add_argument("--event-max-age", type=positive_float, default=86400.0, metavar="SECONDS",
                   help="how long events are kept (default: %(default)s, one day)")
    p.add_argument("--max-streams", type=positive_int, default=100, metavar="N",
                   help="concurrent event streams; more get 503 (default: %(default)s)")
    p.add_argument("--stream-keepalive", type=positive_float, default=15.0, metavar="SECONDS",
                   help="keep-alive period of idle event streams (default: %(default)s)")
    p.add_argument("--statsd-host", metavar="HOST",
                   help="push every metric to this StatsD server (default: no push)")
    p.add_argument("--statsd-port", type=port_number, default=8125,
                   help="StatsD UDP port (default: %(default)s)")
    p.add_argument("--statsd-interval", type=positive_float, default=15.0, metavar="SECONDS",
                   help="StatsD push period (default: %(default)s)")
    p.add_argument("--statsd-prefix", type=statsd_prefix, default="vm", metavar="PREFIX",
                   help="first part of every StatsD key (default: %(default)s)")
    p.add_argument("--statsd-tags", action="store_true",
                   help="DogStatsD tags for uuid, name and device instead of key parts")
    p.add_argument("--statsd-max-packet", type=packet_size, default=1432, metavar="BYTES",
                   help="largest StatsD datagram payload (default: %(default)s)")
    p.add_argument("--max-connections", type=positive_int, default=400, metavar="N",
                   help="open HTTP connections; more get 503 (default: %(default)s)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    p.add_argument("--basic-auth-file", metavar="FILE",
                   help="require HTTP Basic auth; lines user:hash made by --hash-password")
    p.add_argument("--open-healthz", action="store_true",
                   help="let /healthz answer without a password, for probes")
    p.add_argument("--hash-password", metavar="USER",
                   help="read a password (prompt or stdin), print a --basic-auth-file line, exit")
    p.add_argument("--client-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                   help="drop an HTTP client that sends nothing for this long (default: %(default)s)")
    p.add_argument("--once", action="store_true",
                   help="take one sample, print every family /metrics would show for it "
                        "as Prometheus text and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("--version", action="version", version="vadvisor " + VERSION)
    return p


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError("%r must be a positive number" % text)
    return value


def whole_number(low, high=None, what="a whole number"):
    """An argparse type: an int from low to high (no upper bound when None)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not %s" % (text, what))
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                "%d must be %d or more" % (value, low) if high is None
                else "%d is out of range %d-%d" % (value, low, high))
        return value
    return parse


positive_int = whole_number(1)
port_number = whole_number(0, 65535, "a port number")
packet_size = whole_number(64, 65507)


def non_negative_float(text):
    if text.strip() in ("0", "0.0"):
        return 0.0
    return positive_float(text)


def statsd_prefix(text):
    parts = text.split(".")
    if not all(parts) or any(STATSD_UNSAFE_RE.search(p) for p in parts):
        raise argparse.ArgumentTypeError(
            "%r: use letters, digits, '_' and '-', in parts separated by '.'" % text)
    return text


def collect_groups(text):
    groups = [g.strip().lower() for g in text.split(",") if g.strip()]
    if groups == ["all"]:
        return OPTIONAL_GROUPS
    unknown = [g for g in groups if g not in OPTIONAL_GROUPS]
    if unknown:
        raise argparse.ArgumentTypeError("unknown group %s; choose from %s or all"
                                         % (", ".join(unknown), ", ".join(OPTIONAL_GROUPS)))
    return tuple(groups)


def few_malloc_arenas(count=2):
    """Caps the C library's malloc arenas (glibc; elsewhere nothing happens).  glibc
    gives threads arenas of their own, up to eight per core, and each keeps the
    memory it once held: the HTTP server's thread per connection would grow the
    agent's RSS by some 12 MB under many clients, for no speed (Python's lock makes
    the threads take turns anyway).  Called before any thread starts."""
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(-8, count)    # M_ARENA_MAX
    except (ImportError, OSError, AttributeError) as exc:
        log.debug("malloc arenas not capped: %s", exc)


def allow_open_files():
    """Raise the soft limit of open files to the hard one (at most 65,536): the
    kernel tier keeps a few files open per running domain, besides the
    connections, and 1,024 is a common soft limit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.debug("open file limit unchanged: %s", exc)


def setup_logging(verbose):
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


def build_agent(args, users=None, once=False):
    """The agent's parts, wired: once, for --once (no events, no StatsD, the specs
    read at once; the kernel read as --source says, for the values only it has)."""
    registry = Registry(args.collect, args.metadata_label)
    store = DomainStore(args.down_minutes * 60, args.history)
    call = LibvirtCaller(args.libvirt_timeout)
    hypervisor = Hypervisor(args.connect, events=not once)
    specs = SpecReader(call, store, args.metadata_label, inline=once)
    pacer = Pacer(args.interval, args.full_interval)
    sampler = Sampler(hypervisor, call, store, registry, stats_groups(args.collect),
                      pacer.full_interval, pacer.rolling, args.source,
                      JobWatch(call, store), specs)
    loop = SampleLoop(sampler, pacer, History(registry, store, args.history, args.interval),
                      hypervisor, call)
    hub = statsd = None
    if not once:
        hub = EventHub(args.event_history, args.event_max_age, args.max_streams)
        if args.statsd_host:
            statsd = StatsdEmitter(loop, registry, args.statsd_host, args.statsd_port,
                                   args.statsd_interval, args.statsd_prefix, args.statsd_tags,
                                   args.statsd_max_packet)
    agent = Agent(args, hypervisor, call, store, registry, loop, specs, hub, statsd, users)
    if hub is not None:
        watch_events(agent)
    return agent


def watch_events(agent):
    """What each event means for its domain, kept in its record: counted, its XML
    and its values read again, a job looked for."""
    hub, store, registry = agent.hub, agent.store, agent.registry

    def on_lifecycle(name, uuid, event, detail):
        item = hub.publish(name, uuid, event, detail)
        store.lifecycle(uuid, name, item.ms / 1000.0)
        store.count(uuid, name, registry.event_series(item.type, {}))
        store.mark_spec(uuid, name)     # its XML may have changed
        store.want_full(uuid)           # and its devices: a full read next round

    def on_event(name, uuid, event_type, reason, details):
        if event_type == "IOError":     # joins with the disk families by target
            record = store.get(uuid)
            target = disk_target(record.spec if record else None, details.get("device"))
            if target:
                details["target"] = target
        hub.record(name, uuid, event_type, reason, details)
        store.count(uuid, name, registry.event_series(event_type, details))
        if event_type == "JobCompleted":
            store.job_completed(uuid, name, details, time.time())
        if event_type == "MigrationIteration":
            store.hint(uuid)            # a migration runs: its progress every round
        if event_type in XML_CHANGE_EVENTS:
            store.mark_spec(uuid, name)     # metadata or devices changed
            store.want_full(uuid)           # a device's counters too: a full read next round

    agent.hypervisor.on_lifecycle = on_lifecycle
    agent.hypervisor.on_event = on_event
    agent.sampler.jobs.on_end = lambda name, uuid, operation, result: store.count(
        uuid, name, registry.job_ended(operation, result))


def run_once(args):
    """--once: one sample, every family /metrics would show for it, on stdout."""
    agent = build_agent(args, once=True)
    try:
        sample = agent.loop.once()
    except (libvirt.libvirtError, Stuck) as exc:
        sys.stderr.write("vadvisor: cannot read libvirt at %s: %s\n" % (args.connect, exc))
        return 1
    sys.stdout.write(agent.exposition.render(agent, sample))
    return 0


def print_password_line(user):
    """--hash-password: a --basic-auth-file line for USER."""
    if ":" in user or not user.strip():
        sys.stderr.write("vadvisor: a user name must be non-empty and without ':'\n")
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("Password for %s: " % user)
        if getpass.getpass("Again: ") != password:
            sys.stderr.write("vadvisor: the passwords differ\n")
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        sys.stderr.write("vadvisor: empty password\n")
        return 1
    sys.stdout.write("%s:%s\n" % (user, hash_password(password)))
    return 0


def load_security(args):
    """(TLS context or None, Users or None); raises ValueError with a one-line reason."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    tls = users = None
    try:
        if args.tls_cert:
            tls = tls_context(args.tls_cert, args.tls_key)
        if args.basic_auth_file:
            users = Users(args.basic_auth_file)
    except OSError as exc:          # ssl.SSLError is an OSError too
        raise ValueError(str(exc))
    return tls, users


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.hash_password is not None:
        return print_password_line(args.hash_password)
    try:
        tls, users = load_security(args)
    except ValueError as exc:
        sys.stderr.write("vadvisor: %s\n" % exc)
        return 2
    if libvirt is None:
        sys.stderr.write("vadvisor: the libvirt Python binding is missing "
                         "(install python3-libvirt)\n")
        return 1
    silence_libvirt()
    if args.once:
        return run_once(args)

    allow_open_files()
    few_malloc_arenas()
    start_event_loop()
    agent = build_agent(args, users)
    handler = type("AgentHandler", (Handler,), {"agent": agent, "timeout": args.client_timeout})
    try:
        server = make_server(args.listen, args.port, handler, tls, args.max_connections)
    except OSError as exc:
        sys.stderr.write("vadvisor: cannot listen on %s:%d: %s\n"
                         % (args.listen or "*", args.port, exc.strerror or exc))
        return 1
    notifier = SystemdNotifier()

    def shutdown(signum, _frame):
        log.info("signal %d: shutting down", signum)
        notifier.stopping()
        agent.hub.close()       # ends every event stream
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    log.info("vadvisor %s listening on port %d, libvirt %s",
             VERSION, server.server_address[1], args.connect)
    notifier.ready(agent.status())      # the port is bound: READY before any beat
    agent.call.heartbeat = lambda: notifier.beat(agent.status, agent.status_what)
    agent.loop.start()
    if agent.statsd is not None:
        agent.statsd.start()
    server.serve_forever(poll_interval=0.2)
    agent.loop.stop()
    if agent.statsd is not None:
        agent.statsd.stop()
    server.server_close()
    return 0
# =============================================================================
# Appendix: the browser page
# =============================================================================
#
# The page at / and /ui: HTML, CSS and JavaScript inline, nothing from elsewhere
# (the host may be air-gapped).  Data only ever reaches the page as text
# (textContent, SVG attributes): names and metadata are the guests' owners'
# input.  The Content-Security-Policy admits this page's own script and style by
# their hashes, and connections to this origin only.  The script knows no column
# and no chart of its own: the overview describes its columns, and the page
# carries the charts' spec (chart_spec); its header links the routes that say so.

PAGE_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #1f3a5f; color: #fff; padding: 8px 16px; }
header h1 { font-size: 18px; margin: 0; display: inline; }
header nav { display: inline; margin-left: 16px; }
header a { color: #cde; margin-right: 10px; }
main { padding: 8px 16px; }
#summary { margin-left: 12px; color: #555; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { padding: 3px 8px; border-bottom: 1px solid #e4e4e4; text-align: right; white-space: nowrap; }
th { cursor: pointer; background: #eef1f5; user-select: none; }
th.text, td.text { text-align: left; }
td.text { max-width: 24em; overflow: hidden; text-overflow: ellipsis; }
.scroll { overflow-x: auto; }
tr.row:hover { background: #f2f7ff; cursor: pointer; }
.badge { padding: 1px 6px; border-radius: 3px; color: #fff; background: #888; }
.Running { background: #2e7d32; } .Paused { background: #ef8f00; } .Crashed { background: #c62828; }
.Shutoff, .Shutdown { background: #757575; } .PMSuspended, .Blocked { background: #5c6bc0; }
.stale { color: #c62828; font-weight: bold; margin-left: 4px; }
section { margin-top: 16px; }
#detail { display: none; background: #fff; border: 1px solid #ddd; padding: 8px 12px; }
#charts { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figcaption { font-size: 12px; color: #555; }
svg.chart { background: #fcfcfc; border: 1px solid #e4e4e4; }
ul#feed, ul#domain-events { list-style: none; padding: 0; margin: 0; font-family: monospace; font-size: 12px; }
ul#feed li, ul#domain-events li { border-bottom: 1px solid #eee; padding: 2px 0; }
.muted { color: #777; }
"""

PAGE_SCRIPT = r"""
"use strict";
// The overview's columns as it describes them (key, heading, kind), from its first
// document on, and the key of a "mark" column shown beside it; kinds "key", "flag"
// and "mark" have no column of their own ("flag" marks the state).
var COLUMNS = [];
// The state a lifecycle event leaves a domain in, shown before the next sample.
var EVENT_STATES = {Started: "Running", Resumed: "Running", Suspended: "Paused",
  Stopped: "Shutoff", Crashed: "Crashed", PMSuspended: "PMSuspended"};
var view = {rows: [], sortKey: "name", sortUp: true, seq: -1, selected: null, events: [],
  connects: 0};
var interval = 1000;

function $(id) { return document.getElementById(id); }
function el(tag, text, className) {
  var node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}
function bytes(n) {
  if (n === null || n === undefined) return "";
  var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : Math.round(n)) + " " + units[i];
}
function shown(value, kind) {
  if (value === null || value === undefined) return "";
  return kind === "bytes" ? bytes(value) : String(value);
}
function getJSON(url) {
  return fetch(url, {credentials: "same-origin"}).then(function (r) {
    if (!r.ok) throw new Error(url + ": " + r.status);
    return r.json();
  });
}

// -- the overview table -------------------------------------------------------
function textual(c) { return c[2] === "text" || c[2] === "state"; }   // left-aligned, A to Z first
function hostLine(h) {   // "N running, X vCPUs on Y CPUs, A of B memory allocated, VMs use C cores now"
  return h.running + " running, " + h.vcpus + " vCPUs on " + (h.cpus === undefined ? "?" : h.cpus) +
    " CPUs, " + bytes(h.memory_allocated_bytes) + " of " + (h.memory_bytes === undefined ? "?" :
    bytes(h.memory_bytes)) + " memory allocated, VMs use " + h.cpu_cores_used + " cores now";
}
function buildHead(doc) {
  COLUMNS = [];
  doc.columns.forEach(function (key, i) {
    var kind = doc.kinds[i];
    if (kind === "mark") COLUMNS[COLUMNS.length - 1][3] = key;   // shown beside the one before
    else if (kind !== "key" && kind !== "flag") COLUMNS.push([key, doc.headings[i], kind, null]);
  });
  var tr = $("head");
  COLUMNS.forEach(function (c) {
    var th = el("th", c[1], textual(c) ? "text" : "");
    th.dataset.key = c[0];
    th.addEventListener("click", function () {
      view.sortUp = view.sortKey === c[0] ? !view.sortUp : textual(c);
      view.sortKey = c[0];
      render();
    });
    tr.appendChild(th);
  });
}
function refresh() {
  return getJSON("/api/v1.0/overview").then(function (doc) {
    interval = Math.max(250, (doc.interval || 1) * 1000);
    if (doc.seq === view.seq) return;
    if (!COLUMNS.length) buildHead(doc);
    view.seq = doc.seq;
    view.rows = doc.domains.map(function (values) {
      var row = {};
      doc.columns.forEach(function (name, i) { row[name] = values[i]; });
      return row;
    });
    $("updated").textContent = doc.timestamp || "";
    $("host").textContent = hostLine(doc.host || {});
    render();
  }).catch(function (err) { $("updated").textContent = "update failed: " + err.message; });
}
var rowNodes = {};     // uuid -> its <tr>
function rowNode(r) {
  var tr = rowNodes[r.uuid];
  if (!tr) {
    tr = rowNodes[r.uuid] = el("tr", null, "row");
    tr.dataset.uuid = r.uuid;
    COLUMNS.forEach(function (c) { tr.appendChild(el("td", null, (textual(c) ? "text " : "") + c[0])); });
    tr.addEventListener("click", function () { location.hash = "vm=" + tr.dataset.uuid; });
  }
  COLUMNS.forEach(function (c, i) {
    var td = tr.cells[i];
    if (c[2] === "state") {
      var shownState = r.state + (r.stale ? " stale" : "");
      if (td.dataset.shown === shownState) return;
      td.dataset.shown = shownState;
      td.textContent = "";
      td.appendChild(el("span", r.state, "badge " + r.state));
      if (r.stale) td.appendChild(el("span", "stale", "stale"));
    } else {
      var text = shown(r[c[0]], c[2]) + (c[3] && r[c[3]] ? " (" + r[c[3]] + ")" : "");
      if (td.textContent !== text) td.textContent = text;
    }
  });
  return tr;
}
var renderPending = false;
function renderSoon() {      // one render for a burst of events (a replay brings many)
  if (renderPending) return;
  renderPending = true;
  setTimeout(function () { renderPending = false; render(); }, 0);
}
function render() {
  var filter = $("filter").value.toLowerCase(), key = view.sortKey, up = view.sortUp ? 1 : -1;
  var rows = view.rows.filter(function (r) {
    return !filter || (r.name + " " + r.state + " " + r.context + " " + r.uuid)
      .toLowerCase().indexOf(filter) >= 0;
  });
  rows.sort(function (a, b) {
    var x = a[key], y = b[key];
    if (x === y) return a.name < b.name ? -1 : 1;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * up;
  });
  // Rows are kept per domain and only their changed cells are written: with a
  // thousand domains most values stay the same from one update to the next.
  var body = $("overview").tBodies[0];
  rows.forEach(function (r, i) {
    var tr = rowNode(r);
    if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
  });
  while (body.children.length > rows.length) body.removeChild(body.lastChild);
  var present = {};
  view.rows.forEach(function (r) { present[r.uuid] = true; });
  Object.keys(rowNodes).forEach(function (uuid) { if (!present[uuid]) delete rowNodes[uuid]; });
  $("summary").textContent = rows.length + " of " + view.rows.length + " domains";
}

// -- one domain ------------------------------------------------------------------
// The charts as the agent describes them (the spec in #charts' data-spec): each
// series' place in a JSON sample, the factor to the chart's unit, whether a line
// per vCPU; "rate" per second between records, "full rate" between the records of
// full reads only (stats_age 0: the only ones whose disk counters moved).
var CHARTS = JSON.parse($("charts").dataset.spec);
var FORMATS = {percent: function (v) { return v.toFixed(1) + " %"; }, bytes: bytes,
  "bytes/s": function (v) { return bytes(v) + "/s"; }};
function rates(history, pick) {      // [[t, per second], ...] of a counter's samples
  var out = [];
  for (var i = 1; i < history.length; i++) {
    var t0 = Date.parse(history[i - 1].timestamp), t1 = Date.parse(history[i].timestamp);
    var a = pick(history[i - 1]), b = pick(history[i]);
    if (a !== null && b !== null && t1 > t0 && b >= a) out.push([t1, (b - a) * 1000 / (t1 - t0)]);
  }
  return out;
}
function values(history, pick) {     // [[t, value], ...] of a gauge's samples
  return history.map(function (h) { return [Date.parse(h.timestamp), pick(h)]; })
    .filter(function (p) { return p[1] !== null; });
}
function at(node, path) {
  path.forEach(function (k) { node = node === null || node === undefined ? node : node[k]; });
  return typeof node === "number" ? node : null;
}
function devices(h, s) { var list = h; s.list.forEach(function (k) { list = list && list[k]; }); return list || []; }
function reading(s, index) {         // a series' value in one record (a device's, or their sum)
  return function (h) {
    if (!s.list) { var v = at(h, s.field); return v === null ? null : v * s.factor; }
    var found = devices(h, s);
    if (index !== undefined) found = found[index] ? [found[index]] : [];
    if (!found.length) return null;
    return found.reduce(function (sum, d) { return sum + (at(d, s.field) || 0); }, 0) * s.factor;
  };
}
function lines(history, c) {
  var rows = c.how === "full rate" ? history.filter(function (h) { return h.stats_age === 0; }) : history;
  var pick = c.how === "value" ? values : rates, out = [];
  c.series.forEach(function (s) {
    if (s.each) {
      var last = history.length ? devices(history[history.length - 1], s) : [];
      last.forEach(function (_, i) { out.push({name: s.name + " " + i, points: pick(rows, reading(s, i))}); });
    } else {
      out.push({name: s.name, points: pick(rows, reading(s))});
    }
  });
  return out;
}
function chart(title, series, format) {
  var W = 320, H = 110, NS = "http://www.w3.org/2000/svg", colors = ["#1565c0", "#c62828",
    "#2e7d32", "#ef8f00", "#6a1b9a", "#00838f"];
  var points = [].concat.apply([], series.map(function (s) { return s.points; }));
  var figure = el("figure");
  var svg = document.createElementNS(NS, "svg");
  svg.setAttribute("class", "chart"); svg.setAttribute("width", W); svg.setAttribute("height", H);
  if (points.length) {
    var t0 = points.reduce(function (m, p) { return Math.min(m, p[0]); }, Infinity);
    var t1 = points.reduce(function (m, p) { return Math.max(m, p[0]); }, -Infinity);
    var top = points.reduce(function (m, p) { return Math.max(m, p[1]); }, 0) || 1;
    series.forEach(function (s, i) {
      if (!s.points.length) return;    // a value this domain does not have
      var line = document.createElementNS(NS, "polyline");
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", colors[i % colors.length]);
      line.setAttribute("points", s.points.map(function (p) {
        return ((p[0] - t0) / Math.max(1, t1 - t0) * (W - 4) + 2).toFixed(1) + "," +
          (H - 4 - p[1] / top * (H - 16)).toFixed(1);
      }).join(" "));
      svg.appendChild(line);
    });
    var label = document.createElementNS(NS, "text");
    label.setAttribute("x", 4); label.setAttribute("y", 11); label.setAttribute("font-size", 10);
    label.textContent = "max " + format(top);
    svg.appendChild(label);
  }
  figure.appendChild(svg);
  figure.appendChild(el("figcaption", title + ": " + series.map(function (s) {
    var last = s.points[s.points.length - 1];
    return s.name + " " + (last ? format(last[1]) : "-");
  }).join(", ")));
  return figure;
}
function drawCharts(history) {
  var box = $("charts");
  box.textContent = "";
  CHARTS.forEach(function (c) { box.appendChild(chart(c.title, lines(history, c), FORMATS[c.unit])); });
}
function attr(node, path) {      // a spec value: {"value": ...} or a plain value
  path.split(".").forEach(function (k) { node = node && node[k]; });
  return node && typeof node === "object" ? node.value : node;
}
var UNITS = {b: 1, bytes: 1, k: 1024, KiB: 1024, M: 1048576, MiB: 1048576,
  G: 1073741824, GiB: 1073741824, KB: 1000, MB: 1e6, GB: 1e9};
function memory(m) {             // a spec's {"unit": "KiB", "value": 32768} in bytes
  return m ? Number(m.value) * (UNITS[m.unit || "KiB"] || 1024) : null;
}
function showSpec(spec) {
  var list = $("spec");
  list.textContent = "";
  function item(text) { list.appendChild(el("li", text)); }
  item("vCPUs: " + (attr(spec, "vcpu") || "?") + ", memory: " + bytes(memory(spec.memory)) +
       (spec.currentMemory ? " (current " + bytes(memory(spec.currentMemory)) + ")" : ""));
  (spec.devices || []).forEach(function (d) {
    if (d.family === "disk") {
      var source = d.source ? (d.source.file || d.source.dev || d.source.name ||
                               d.source.volume || JSON.stringify(d.source)) : "(none)";
      item("disk " + attr(d, "target.dev") + " (" + (d.device || "disk") + "): " + source);
    } else if (d.family === "interface") {
      item("NIC " + (attr(d, "target.dev") || "") + " " + (attr(d, "mac.address") || "") +
           " (" + (d.type || "") + (attr(d, "model.type") ? ", " + attr(d, "model.type") : "") + ")");
    }
  });
}
function showDomainEvents() {
  var list = $("domain-events");
  list.textContent = "";
  view.events.filter(function (e) { return e.domain_id === view.selected; }).slice(-20)
    .reverse().forEach(function (e) { list.appendChild(el("li", describe(e))); });
}
function refreshDetail() {
  if (!view.selected) return Promise.resolve();
  var uuid = view.selected;
  return getJSON("/api/v1.0/stats/" + uuid).then(function (doc) {
    if (uuid === view.selected) drawCharts(doc[uuid] || []);
  }).catch(function () {});
}
function select() {
  var m = /^#vm=([0-9a-f-]{36})$/.exec(location.hash);
  view.selected = m ? m[1] : null;
  $("detail").style.display = m ? "block" : "none";
  if (!m) return;
  var row = view.rows.filter(function (r) { return r.uuid === view.selected; })[0];
  $("detail-name").textContent = row ? row.name : view.selected;
  $("detail-uuid").textContent = view.selected;
  $("spec").textContent = "";
  getJSON("/api/v1.0/specs/" + view.selected).then(showSpec).catch(function (err) {
    $("spec").appendChild(el("li", "no spec: " + err.message, "muted"));
  });
  showDomainEvents();
  refreshDetail();
}

// -- the event feed ----------------------------------------------------------------
function describe(e) {
  return e.timestamp + "  " + e.domain_name + "  " + e.event_type +
    (e.reason ? "/" + e.reason : "") + (e.details ? "  " + JSON.stringify(e.details) : "");
}
function onEvent(e) {
  view.events.push(e);
  if (view.events.length > 500) view.events.shift();
  var feed = $("feed");
  feed.insertBefore(el("li", describe(e)), feed.firstChild);
  while (feed.childNodes.length > 100) feed.removeChild(feed.lastChild);
  var state = EVENT_STATES[e.event_type];
  if (state) {
    view.rows.forEach(function (r) { if (r.uuid === e.domain_id) r.state = state; });
    renderSoon();
  }
  if (e.domain_id === view.selected) showDomainEvents();
}
function listen() {
  // The last 15 minutes first; after a reconnect the browser sends Last-Event-ID
  // and the agent replays what was missed.
  var since = new Date(Date.now() - 15 * 60 * 1000).toISOString();
  var source = new EventSource("/api/v1.0/events?start_time=" + encodeURIComponent(since));
  source.onmessage = function (m) { onEvent(JSON.parse(m.data)); };
  source.onopen = function () { view.connects++; $("feed-state").textContent = "live"; };
  source.onerror = function () {
    $("feed-state").textContent = "reconnecting";
    // A refused stream (503 at --max-streams, 401) is not retried by the
    // browser: start a new one a little later.
    if (source.readyState === EventSource.CLOSED) setTimeout(listen, 5000);
  };
}

function loop() {
  Promise.all([refresh(), refreshDetail()]).then(function () { setTimeout(loop, interval); });
}
$("filter").addEventListener("input", render);
window.addEventListener("hashchange", select);
refresh().then(select);
setTimeout(loop, interval);
listen();
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vadvisor %(host)s</title>
<style>%(style)s</style></head>
<body>
<header><h1>vadvisor</h1> <span>%(version)s, libvirt at <code>%(uri)s</code></span>
<nav>
%(links)s
</nav></header>
<main>
<p id="host" class="muted"></p>
<p><input id="filter" type="search" placeholder="filter: name, state, context"><span id="summary"></span>
<span class="muted">updated <span id="updated">-</span></span></p>
<section id="detail"><h2><span id="detail-name"></span> <small class="muted" id="detail-uuid"></small>
<a href="#">close</a></h2>
<div id="charts" data-spec="%(charts)s"></div>
<h3>Spec</h3><ul id="spec"></ul>
<h3>Recent events</h3><ul id="domain-events"></ul></section>
<div class="scroll"><table id="overview"><thead><tr id="head"></tr></thead><tbody></tbody></table></div>
<section><h2>Events <small class="muted" id="feed-state">connecting</small></h2><ul id="feed"></ul></section>
</main>
<noscript>This page needs JavaScript; the links above work without it.</noscript>
<script>%(script)s</script>
</body></html>
"""



def csp_hash(text):
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


PAGE_CSP = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
            "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            % (csp_hash(PAGE_SCRIPT), csp_hash(PAGE_STYLE)))
PAGE_HEADERS = (("Content-Security-Policy", PAGE_CSP), ("X-Content-Type-Options", "nosniff"),
                ("Referrer-Policy", "no-referrer"))


def page_html(version, uri, charts):
    """The page; the only values put in by the server are the operator's own and the
    agent's (its routes, its charts)."""
    links = "\n".join('<a href="%s">%s</a>' % (route.path, route.path)
                      for route in ROUTES if route.link)
    return PAGE % {"host": html_escape(platform.node()), "style": PAGE_STYLE,
                   "script": PAGE_SCRIPT, "version": html_escape(version),
                   "uri": html_escape(uri), "links": links,
                   "charts": html_escape(json.dumps(charts, separators=(",", ":")))}


if __name__ == "__main__":
    sys.exit(main())
