#!/usr/bin/env python3
"""llama.cpp's RPC split vs our 2-stage pipeline through the same kernel-shaped link (issue 15, part 2).

    .venv/bin/python scripts/rpc_compare.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--repeats 3]

End to end, as root on one machine: builds llama.cpp's ggml-rpc-server and llama-bench with RPC (if missing),
brings up the 2-host lab (scripts/netlab_hosts.sh: namespaces pi-h1 10.77.0.11, pi-h2 10.77.0.12), and for each
link condition and model runs, interleaved, `--repeats` times each:

  rpc     llama-bench (pi-h1, -t 1) --rpc -> [delay relay in pi-h1] -> ggml-rpc-server (pi-h2, -t 1), -p 0 -n 64
  ours    pipeinfer-cpu run --stages 2 --mode pipeline -t 1 -n 64: head + stage 1 on pi-h1, stage 2 on pi-h2

Link conditions:
  unshaped       lab0 as is (veth + bridge, no qdisc, no relay, no emulated delay)
  100mbit+2ms    tbf 100mbit (burst 64kb, latency 50ms) on lab0 of both hosts (so both directions);
                 delay 2 ms one way: for rpc the relay (scripts/delay_relay.py) between llama-bench and the
                 link; for ours the transport's own emulation, set by a hostfile line
                 `# link pi-h1 pi-h2 delay=2ms` (only the pair that crosses the link; head and stage 1 share
                 pi-h1) and, as a second variant, `--link delay=2ms` (every pair of ranks, the head<->stage 1
                 pair on one host too: one more delayed hop per token than the physical setting)

Writes bench-results/local-2core/rpc-compare/{results.json,table.md}; leaves the lab down if it brought it up
(shaping removed either way). All processes share this machine's cores: see the table's notes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA = Path(os.environ.get("LLAMA_SRC", "/work/tmp/llama-src/llama.cpp"))
BUILD = LLAMA / "build-rpc"
RPC_SERVER = BUILD / "bin" / "ggml-rpc-server"
LLAMA_BENCH = BUILD / "bin" / "llama-bench"
LAB_SCRIPT = REPO / "scripts" / "netlab_hosts.sh"
RELAY = REPO / "scripts" / "delay_relay.py"
LAB_DIR = Path(os.environ.get("PIPEINFER_LAB_DIR", "/tmp/pipeinfer-lab"))
OUT = REPO / "bench-results" / "local-2core" / "rpc-compare"
WORK = Path(os.environ.get("RPC_COMPARE_WORK", "/work/tmp/rpccmp"))
PIPEINFER = REPO / ".venv" / "bin" / "pipeinfer-cpu"
PYTHON = REPO / ".venv" / "bin" / "python"

H1, H2 = "pi-h1", "pi-h2"
H2_ADDR = "10.77.0.12"
RPC_PORT, RELAY_PORT, ECHO_PORT = 50052, 50100, 50053
RATE, DELAY_MS = "100mbit", 2.0
TBF = ["tbf", "rate", RATE, "burst", "64kb", "latency", "50ms"]
N_GEN = 64
PROMPT = "The history of the city"
MODELS = {  # name: (path resolver key, repeating layers)
    "smollm2-135m": 30,
    "qwen2.5-coder-0.5b": 24,
}


def log(*args: object) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)


def in_ns(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


# -- build, lab, shaping ------------------------------------------------------------------------------------

def build() -> None:
    if RPC_SERVER.exists() and LLAMA_BENCH.exists():
        return
    log("building ggml-rpc-server and llama-bench into", BUILD)
    run(["cmake", "-S", str(LLAMA), "-B", str(BUILD), "-DGGML_RPC=ON", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TOOLS=ON",
         "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"])
    run(["cmake", "--build", str(BUILD), "--target", "ggml-rpc-server", "llama-bench", "-j2"])


class Lab:
    def __init__(self) -> None:
        self.started = False
        self.shaped = False
        self.env: dict[str, str] = {}

    def namespaces(self) -> set[str]:
        return {line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()}

    def healthy(self) -> bool:
        if not {H1, H2} <= self.namespaces() or not (LAB_DIR / "env").exists():
            return False
        return all(run([str(LAB_DIR / "ssh"), "-o", "ConnectTimeout=2", h, "true"], check=False).returncode == 0
                   for h in (H1, H2))

    def ensure(self) -> None:
        """The lab up (again, if another test took it down), with the current shaping."""
        if not self.healthy():
            log("lab not up: bringing it up (2 hosts)")
            run(["bash", str(LAB_SCRIPT), "down"], check=False)
            run(["bash", str(LAB_SCRIPT), "up", "2"])
            self.started = True
            if self.shaped:
                self.shape(True)
        self.env = dict(os.environ)
        for line in (LAB_DIR / "env").read_text().replace("\\\n", "").splitlines():
            if line.startswith("export "):
                key, _, value = line[len("export "):].partition("=")
                self.env[key] = value.strip('"')

    def shape(self, on: bool) -> None:
        self.shaped = on
        for ns in (H1, H2):
            if on:
                run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "lab0", "root", *TBF])
            else:
                run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lab0", "root"], check=False)

    def qdiscs(self) -> dict[str, str]:
        return {ns: run(in_ns(ns, ["tc", "-s", "qdisc", "show", "dev", "lab0"]), check=False).stdout.strip()
                for ns in (H1, H2)}

    def finish(self) -> None:
        if H1 in self.namespaces():
            self.shape(False)
        if self.started:
            run(["bash", str(LAB_SCRIPT), "down"], check=False)


# -- helpers: processes in namespaces -----------------------------------------------------------------------

def wait_port(ns: str, host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on host:port as seen from `ns` (ss in the listener's namespace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = run(in_ns(ns, ["ss", "-ltnH"]), check=False).stdout
        if f"{host}:{port} " in out:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} in {ns}")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_relay(stats: Path, trace: Path | None = None) -> subprocess.Popen:
    cmd = in_ns(H1, [sys.executable, str(RELAY), "--listen", f"127.0.0.1:{RELAY_PORT}",
                     "--connect", f"{H2_ADDR}:{RPC_PORT}", "--delay-ms", f"{DELAY_MS:g}", "--stats", str(stats)])
    if trace is not None:
        cmd += ["--trace", str(trace)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(H1, "127.0.0.1", RELAY_PORT)
    return proc


# -- link calibration: what a 2.3 KB message and a bulk transfer see on the path --------------------------

ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4)
while True:
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    mode = c.recv(1)
    if mode == b"e":            # echo 2304-byte messages
        while True:
            buf = b""
            while len(buf) < 2304:
                d = c.recv(65536)
                if not d: break
                buf += d
            if len(buf) < 2304: break
            c.sendall(buf)
    else:                       # sink: read n bytes, answer one byte
        n = int.from_bytes(c.recv(8, socket.MSG_WAITALL), "little"); got = 0
        while got < n: got += len(c.recv(1 << 20))
        c.sendall(b"k")
    c.close()
"""

ECHO_CLIENT = """
import socket, sys, time, statistics, json
host, port = sys.argv[1], int(sys.argv[2])
c = socket.create_connection((host, port)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.sendall(b"e"); msg = b"x" * 2304; ts = []
for i in range(100):
    t = time.perf_counter(); c.sendall(msg); got = 0
    while got < 2304: got += len(c.recv(65536))
    ts.append(time.perf_counter() - t)
c.close()
n = 8 << 20
c = socket.create_connection((host, port)); c.sendall(b"s" + n.to_bytes(8, "little"))
t = time.perf_counter(); c.sendall(b"\\0" * n); c.recv(1); dt = time.perf_counter() - t
rtt = statistics.median(ts)
print(json.dumps({"rtt_2304B_median_ms": round(rtt * 1e3, 3), "rtt_2304B_min_ms": round(min(ts) * 1e3, 3),
                  "bulk_8MiB_mbit_s": round(n * 8 / (dt - rtt / 2) / 1e6, 1)}))
"""


def calibrate(delayed: bool) -> dict:
    """The RPC path's RTT for a hidden-state-sized message and its bulk rate (through the relay if delayed)."""
    server = subprocess.Popen(in_ns(H2, [sys.executable, "-c", ECHO_SERVER, H2_ADDR, str(ECHO_PORT)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    relay = None
    try:
        wait_port(H2, H2_ADDR, ECHO_PORT)
        target = (H2_ADDR, ECHO_PORT)
        if delayed:
            relay = subprocess.Popen(in_ns(H1, [sys.executable, str(RELAY), "--listen", f"127.0.0.1:{RELAY_PORT}",
                                                "--connect", f"{H2_ADDR}:{ECHO_PORT}", "--delay-ms", f"{DELAY_MS:g}"]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(H1, "127.0.0.1", RELAY_PORT)
            target = ("127.0.0.1", RELAY_PORT)
        out = run(in_ns(H1, [sys.executable, "-c", ECHO_CLIENT, target[0], str(target[1])]), timeout=120).stdout
        return json.loads(out)
    finally:
        stop(relay)
        stop(server)


# -- the two systems ----------------------------------------------------------------------------------------

def rpc_command(model: Path, ngl: int, endpoint: str) -> list[str]:
    return [str(LLAMA_BENCH), "-m", str(model), "--rpc", endpoint, "-ngl", str(ngl), "-p", "0", "-n", str(N_GEN),
            "-t", "1", "-r", "1", "-o", "json"]


def run_rpc(model: Path, ngl: int, delayed: bool, tag: str, trace: Path | None = None) -> dict:
    server_log = WORK / f"{tag}.rpc-server.log"
    server = subprocess.Popen(in_ns(H2, [str(RPC_SERVER), "-H", H2_ADDR, "-p", str(RPC_PORT), "-t", "1"]),
                              stdout=server_log.open("w"), stderr=subprocess.STDOUT)
    relay = None
    relay_stats = WORK / f"{tag}.relay.json"
    try:
        wait_port(H2, H2_ADDR, RPC_PORT)
        endpoint = f"{H2_ADDR}:{RPC_PORT}"
        if delayed:
            relay = start_relay(relay_stats, trace)
            endpoint = f"127.0.0.1:{RELAY_PORT}"
        cmd = rpc_command(model, ngl, endpoint)
        t0 = time.monotonic()
        proc = run(in_ns(H1, cmd), check=False, timeout=600)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
        test = json.loads(proc.stdout)[0]
        result = {"tok_s": test["avg_ts"], "samples_ts": test["samples_ts"], "n_gen": test["n_gen"],
                  "n_gpu_layers": test["n_gpu_layers"], "wall_s": round(wall, 2)}
    finally:
        stop(relay)
        stop(server)
    if delayed and relay_stats.exists():
        result["relay"] = json.loads(relay_stats.read_text())
    return result


def ours_command(model: Path, hostfile: Path, stats: Path, link: str | None) -> list[str]:
    cmd = [str(PIPEINFER), "run", "--hostfile", str(hostfile), "--stages", "2", "--mode", "pipeline", "-t", "1",
           "-n", str(N_GEN), "-m", str(model), "-p", PROMPT, "--stats-json", str(stats)]
    return cmd + (["--link", link] if link else [])


def run_ours(lab: Lab, model: Path, hostfile: Path, link: str | None, tag: str) -> dict:
    stats = WORK / f"{tag}.stats.json"
    stats.unlink(missing_ok=True)
    cmd = ours_command(model, hostfile, stats, link)
    t0 = time.monotonic()
    proc = run(cmd, check=False, timeout=600, env=lab.env, cwd=REPO)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pipeinfer-cpu failed ({proc.returncode}): {proc.stderr[-2000:]}")
    s = json.loads(stats.read_text())
    if s["n_generated"] != N_GEN:
        raise RuntimeError(f"pipeinfer-cpu generated {s['n_generated']} tokens, not {N_GEN} ({s['stopped_by']})")
    return {"tok_s": s["decode_tokens_per_s"], "itl_p50_ms": round(s["itl_p50_s"] * 1e3, 3),
            "decode_bytes_per_token": s["decode_bytes_per_token"], "n_gen": s["n_generated"],
            "layers": [st["layers"] for st in s["stages"]], "hosts": [st["host"] for st in s["stages"]],
            "wall_s": round(wall, 2)}


def retried(lab: Lab, fn, *args, **kw) -> dict:
    """One run; if it fails (e.g. another engineer's test took the lab down), bring the lab back and retry once."""
    for attempt in (1, 2):
        lab.ensure()
        try:
            return fn(*args, **kw)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, KeyError) as e:
            log(f"run failed (attempt {attempt}): {str(e)[-500:]}")
            if attempt == 2:
                raise
            time.sleep(1)


# -- the RPC path's traffic per token, read from a relay trace ----------------------------------------------

def per_token_traffic(trace: Path, tok_s: float, n_tokens: int = N_GEN, gap_s: float = 0.5e-3) -> dict:
    """Messages (runs of reads separated by > gap_s) and bytes per direction per token in the steady
    generation phase: the last 3/4 of the tg time before the client's last read."""
    rows = [line.split() for line in trace.read_text().splitlines()]
    rows = [(float(t), d, int(n)) for t, d, n in rows]
    end = max(t for t, d, _ in rows if d == "down")
    t_gen = n_tokens / tok_s
    lo, hi = end - 0.8 * t_gen, end - 0.05 * t_gen
    out = {}
    for d in ("up", "down"):
        times = [(t, n) for t, dd, n in rows if dd == d and lo <= t <= hi]
        msgs, last = 0, -1.0
        for t, _ in times:
            if t - last > gap_s:
                msgs += 1
            last = t
        tokens = (hi - lo) * tok_s
        out[d] = {"messages_per_token": round(msgs / tokens, 2), "bytes_per_token": round(sum(n for _, n in times) / tokens)}
    return {"client_to_server": out["up"], "server_to_client": out["down"], "window_s": round(hi - lo, 3)}


# -- main -----------------------------------------------------------------------------------------------------

def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "kernel": platform.release(),
            "note": f"{os.cpu_count()}-vCPU VM ({cpu}); every process of both systems (llama-bench, rpc-server, "
                    "the relay; our head, stage ranks, MPI) runs on these same cores: the 'hosts' are network "
                    "namespaces of one machine, -t 1 per side"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-link-all", action="store_true", help="skip the `--link delay=2ms` (every pair) variant")
    ap.add_argument("--table-only", action="store_true", help="rewrite table.md from results.json")
    args = ap.parse_args()
    if args.table_only:
        (OUT / "table.md").write_text(table(json.loads((OUT / "results.json").read_text())))
        return
    if os.geteuid() != 0:
        sys.exit("rpc_compare.py: needs root (network namespaces, tc)")
    build()
    WORK.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from pipeinfer_cpu.modelfiles.registry import resolve_model

    lab = Lab()
    results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "n_gen": N_GEN,
                     "prompt_ours": PROMPT, "repeats": args.repeats, "link": {}, "points": []}
    hosts_plain = WORK / "hosts-plain.txt"
    hosts_plain.write_text(f"{H1}\n{H2}\n")
    hosts_delay = WORK / "hosts-delay.txt"
    hosts_delay.write_text(f"{H1}\n{H2}\n# link {H1} {H2} delay={DELAY_MS:g}ms\n")
    conditions = [("unshaped", False), (f"{RATE}+{DELAY_MS:g}ms", True)]
    try:
        lab.ensure()
        for cond, shaped in conditions:
            lab.shape(shaped)
            lab.ensure()
            log("condition", cond, "- calibrating the RPC path")
            results["link"][cond] = {"rpc_path": calibrate(shaped), "tc": TBF if shaped else None,
                                     "relay_delay_ms_each_way": DELAY_MS if shaped else None}
            for name in args.models.split(","):
                model = Path(resolve_model(name)) if not Path(name).exists() else Path(name)
                n_layer = MODELS.get(name)
                if n_layer is None:
                    raise SystemExit(f"unknown layer count for {name}")
                half = n_layer // 2
                # llama.cpp offloads the LAST ngl "layers", counting the output layer as one (index n_layer), so
                # the output head is always on the RPC device and the logits come back each token:
                # ngl = half   -> layers half+1..n-1 + output head on RPC (one layer fewer than ours' stage 2)
                # ngl = half+1 -> layers half..n-1 + output head on RPC (ours' split exactly)
                variants = [("rpc", {"ngl": half}), ("rpc", {"ngl": half + 1}), ("ours", {"link": "pair"})]
                if shaped and not args.no_link_all:
                    variants.append(("ours", {"link": "all"}))
                samples: dict[str, list[dict]] = {}
                for rep in range(args.repeats):
                    for system, opt in variants:
                        key = f"{system}:" + ",".join(f"{k}={v}" for k, v in opt.items())
                        tag = f"{name}.{cond}.{key.replace(':', '.').replace('=', '')}.{rep}"
                        log(cond, name, key, "rep", rep + 1)
                        if system == "rpc":
                            r = retried(lab, run_rpc, model, opt["ngl"], shaped, tag)
                        else:
                            hostfile, link = hosts_plain, None
                            if shaped:
                                hostfile, link = ((hosts_delay, None) if opt["link"] == "pair"
                                                  else (hosts_plain, f"delay={DELAY_MS:g}ms"))
                            r = retried(lab, run_ours, lab, model, hostfile, link, tag)
                        log(f"  {r['tok_s']:.2f} tok/s")
                        samples.setdefault(key, []).append(r)
                # one traced RPC run per model on the delayed link: messages and bytes per token on the link
                traffic = {}
                if shaped:
                    for ngl in (half, half + 1):
                        trace = WORK / f"{name}.trace.ngl{ngl}.txt"
                        r = retried(lab, run_rpc, model, ngl, True, f"{name}.trace.ngl{ngl}", trace)
                        traffic[f"ngl={ngl}"] = per_token_traffic(trace, r["tok_s"]) | {"tok_s": r["tok_s"]}
                point = {"condition": cond, "model": name, "model_path": str(model), "n_layer": n_layer,
                         "qdisc_after": lab.qdiscs() if shaped else None, "systems": {}, "rpc_traffic": traffic}
                for key, rs in samples.items():
                    entry = {"tok_s_median": round(median([r["tok_s"] for r in rs]), 3),
                             "tok_s": [round(r["tok_s"], 3) for r in rs], "runs": rs}
                    system = key.split(":")[0]
                    if system == "rpc":
                        ngl = int(key.split("ngl=")[1])
                        entry["command"] = " ".join(in_ns(H1, rpc_command(model, ngl, f"127.0.0.1:{RELAY_PORT}"
                                                                           if shaped else f"{H2_ADDR}:{RPC_PORT}")))
                        entry["server_command"] = " ".join(in_ns(H2, [str(RPC_SERVER), "-H", H2_ADDR, "-p",
                                                                      str(RPC_PORT), "-t", "1"]))
                        # the output layer counts as layer n_layer, the last: it is offloaded first
                        entry["split"] = (f"client (pi-h1): embeddings + layers 0-{n_layer - ngl}; rpc-server "
                                          f"(pi-h2): layers {n_layer + 1 - ngl}-{n_layer - 1} + output head "
                                          "(the logits come back each token)")
                        if shaped:
                            cpu = [r["relay"]["cpu_s"] for r in rs]
                            share = [r["relay"]["cpu_share_of_one_core"] for r in rs]
                            entry["relay_cpu_s_median"] = median(cpu)
                            entry["relay_cpu_share_median"] = median(share)
                            entry["relay_command"] = " ".join(in_ns(H1, [sys.executable, str(RELAY), "--listen",
                                                                         f"127.0.0.1:{RELAY_PORT}", "--connect",
                                                                         f"{H2_ADDR}:{RPC_PORT}", "--delay-ms",
                                                                         f"{DELAY_MS:g}"]))
                    else:
                        link = key.split("link=")[1]
                        hostfile = hosts_plain if (not shaped or link == "all") else hosts_delay
                        entry["command"] = ("PIPEINFER_SSH=... PIPEINFER_MPIEXEC_ARGS=... (from the lab's env) " + " ".join(
                            ours_command(model, hostfile, Path("STATS.json"),
                                         f"delay={DELAY_MS:g}ms" if shaped and link == "all" else None)))
                        if shaped and link == "pair":
                            entry["hostfile"] = hosts_delay.read_text()
                        (a0, a1), (b0, b1) = rs[0]["layers"]  # half-open ranges
                        entry["split"] = (f"head + stage 1 (embeddings + layers {a0}-{a1 - 1}) on pi-h1; "
                                          f"stage 2 (layers {b0}-{b1 - 1} + output head + argmax) on pi-h2")
                    point["systems"][key] = entry
                point["ratio_ours_over_rpc"] = {
                    f"{o} / {r}": round(point["systems"][o]["tok_s_median"] / point["systems"][r]["tok_s_median"], 3)
                    for o in point["systems"] if o.startswith("ours") for r in point["systems"] if r.startswith("rpc")}
                results["points"].append(point)
                (OUT / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    finally:
        lab.finish()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (OUT / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (OUT / "table.md").write_text(table(results))
    print(table(results))


def table(res: dict) -> str:
    lines = ["# llama.cpp RPC split vs our 2-stage pipeline, same kernel-shaped link", "",
             f"Machine: {res['machine']['note']}. Kernel {res['machine']['kernel']}.", "",
             f"Decode speed, tok/s (median of {res['repeats']}; {res['n_gen']} generated tokens, greedy/no sampling, "
             "-t 1 per side). rpc: llama-bench tg64 (avg_ts); ours: decode_tokens_per_s (1 / mean inter-token "
             "latency).", "",
             "| link | model | rpc -ngl h | rpc -ngl h+1 (= our split) | ours (delay on the pair) "
             "| ours (--link: every pair) | ours / best rpc | relay CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        s = p["systems"]
        rpc = {k: v for k, v in s.items() if k.startswith("rpc")}
        keys = sorted(rpc, key=lambda k: int(k.split("ngl=")[1]))
        best = max(v["tok_s_median"] for v in rpc.values())
        pair = s.get("ours:link=pair", {}).get("tok_s_median")
        alls = s.get("ours:link=all", {}).get("tok_s_median")
        relay = [f"{rpc[k]['relay_cpu_share_median'] * 100:.0f}%" for k in keys if "relay_cpu_share_median" in rpc[k]]
        cells = [f"{rpc[k]['tok_s_median']:.2f} (ngl {k.split('ngl=')[1]})" for k in keys]
        lines.append(f"| {p['condition']} | {p['model']} | {cells[0]} | {cells[1]} | {pair:.2f} | "
                     f"{'-' if alls is None else f'{alls:.2f}'} | {pair / best:.2f}x | "
                     f"{'/'.join(relay) if relay else '-'} |")
    lines += ["", "Link calibration (RPC path, 2304-byte ping-pong through the relay when delayed; 8 MiB bulk):", ""]
    for cond, c in res["link"].items():
        lines.append(f"- {cond}: {json.dumps(c['rpc_path'])}")
    lines += ["", "RPC traffic per token on the link (from a relay trace, steady part of tg):", ""]
    for p in res["points"]:
        for k, t in p.get("rpc_traffic", {}).items():
            lines.append(f"- {p['model']} {k}: client->server {t['client_to_server']}, server->client "
                         f"{t['server_to_client']}")
    for title, key in (("How each system uses the link", "mechanics"), ("Caveats", "caveats")):
        if res.get(key):
            lines += ["", f"{title}:", ""] + [f"- {text}" for text in res[key]]
    if res.get("extra_rpc_variant_output_on_client"):
        x = res["extra_rpc_variant_output_on_client"]
        lines += ["", f"Tried and left out: {x['what']}: tok/s {x['tok_s']}; {x['finding']}."]
    lines += ["", "Commands: see results.json (`command`, `server_command`, `relay_command` of each system).", "",
              "Splits:", ""]
    for p in res["points"][:len(res["points"]) // max(1, len(res["link"]))] or res["points"]:
        for k, v in p["systems"].items():
            lines.append(f"- {p['model']} {k}: {v['split']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
