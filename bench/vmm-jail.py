#!/usr/bin/env python3
# Benchmark: the VMM binary's own cost, unjailed and jailed, with the idle
# freestanding guest (256 MiB, 1 vCPU, seccomp on), 7 runs each: VMM start
# -> first guest instruction (first vCPU exit, from the metrics request) and
# the VMM's RSS without guest memory, 1 s after start. Optionally an older
# `vmpod vmm` binary for the before/after (argument 1: its path).
# Usage: bench/vmm-jail.py [OLD_VMPOD] (after `cargo build --release -p
# vmpod-vmm` and building the freestanding guest to /tmp/bench-jail/g.elf).
import json, os, subprocess, sys, time, socket, statistics
def ctl(path, req):
    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(path)
    s.sendall((json.dumps(req) + "\n").encode()); buf = b""
    while not buf.endswith(b"\n"):
        c = s.recv(65536)
        if not c: break
        buf += c
    return json.loads(buf)
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"): return int(l.split()[1])
def one(argv, jail, n):
    d = f"/tmp/bench-jail/r{n}"; os.makedirs(d + "/jail", exist_ok=True)
    cfg = {"vcpus":1,"memory_mib":256,"kernel":"/tmp/bench-jail/g.elf","cmdline":"guest.idle",
           "serial":{"path":d+"/serial.log"},"control_socket":d+"/c.sock","seccomp":True}
    if jail: cfg["jail"] = {"root": d+"/jail", "uid": 1342177290, "gid": 1342177290, "new_netns": True}
    json.dump(cfg, open(d+"/vmm.json","w"))
    try: os.unlink(d+"/c.sock")
    except FileNotFoundError: pass
    p = subprocess.Popen(argv + ["--config", d+"/vmm.json"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    for _ in range(500):
        if os.path.exists(d+"/c.sock"):
            try:
                m = ctl(d+"/c.sock", {"op":"metrics"}); break
            except Exception: pass
        time.sleep(0.01)
    time.sleep(1.0)
    m = ctl(d+"/c.sock", {"op":"metrics"})
    pids = [p.pid]
    try: pids += [int(x) for x in open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()]
    except Exception: pass
    r = [rss(x) for x in pids]
    p.kill(); p.wait()
    return m["first_exit_ns"]/1e6, m["vmm_rss_excluding_guest_bytes"]/1024, r
target = os.environ.get("VMPOD_TARGET", os.path.join(os.path.dirname(__file__), "..", "target"))
vmm = os.path.join(target, "release", "vmpod-vmm")
runs = [("vmpod-vmm unjailed", [vmm], False), ("vmpod-vmm jailed", [vmm], True)]
if len(sys.argv) > 1:
    runs.insert(0, ("old `vmpod vmm`", [sys.argv[1], "vmm"], False))
for name, argv, jail in runs:
    res = [one(argv, jail, i) for i in range(7)]
    fe = sorted(x[0] for x in res); ex = sorted(x[1] for x in res)
    print(f"{name}: first guest exit ms min {fe[0]:.1f} median {statistics.median(fe):.1f} max {fe[-1]:.1f}; "
          f"VMM RSS excl. guest KiB median {statistics.median(ex):.0f}; VmRSS KiB per process (last run) {res[-1][2]}")
