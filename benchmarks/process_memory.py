"""Memory of a process and its descendants, read from /proc (Linux): for benchmarks that measure what a step costs
in resident memory (cache_scale.py)."""

import os
import threading


def _ppids() -> dict:
    """pid -> parent pid, for every process visible in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2 :].split()  # the command name may hold spaces and parentheses
        out[int(name)] = int(rest[1])
    return out


def _tree(root: int) -> list:
    children = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def memory_of(pid: int) -> dict:
    """VmRSS, RssAnon, RssFile and Pss of ``pid`` in bytes, CPU seconds (utime+stime); {} if it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1]) * 1024
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rfind(b")") + 2 :].split()
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return {}
    return out


class TreeSampler:
    """Samples the memory of a process and all its descendants from /proc in a background thread."""

    def __init__(self, root: int, interval: float):
        self.root, self.interval = root, interval
        self.peak = {"rss": 0, "pss": 0, "anon": 0, "file": 0, "root_rss": 0, "one_process_rss": 0, "children_rss": 0}
        self.max_processes = 0
        self.cpu = {}  # pid -> last CPU seconds seen
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self):
        totals = {"rss": 0, "pss": 0, "anon": 0, "file": 0}
        tree = _tree(self.root)
        alive, children = 0, 0
        for pid in tree:
            m = memory_of(pid)
            if not m:
                continue
            alive += 1
            totals["rss"] += m.get("VmRSS", 0)
            totals["pss"] += m.get("Pss", 0)
            totals["anon"] += m.get("RssAnon", 0)
            totals["file"] += m.get("RssFile", 0) + m.get("RssShmem", 0)
            self.peak["one_process_rss"] = max(self.peak["one_process_rss"], m.get("VmRSS", 0))
            if pid == self.root:
                self.peak["root_rss"] = max(self.peak["root_rss"], m.get("VmRSS", 0))
            else:
                children += m.get("VmRSS", 0)
            self.cpu[pid] = m["cpu_s"]
        for k, v in totals.items():
            self.peak[k] = max(self.peak[k], v)
        self.peak["children_rss"] = max(self.peak["children_rss"], children)
        self.max_processes = max(self.max_processes, alive)
        self.samples += 1

    def summary(self, busy_cpu_s: float = 1.0) -> dict:
        workers = [pid for pid, s in self.cpu.items() if pid != self.root and s >= busy_cpu_s]
        return {
            "peak_tree_rss_bytes": self.peak["rss"],
            "peak_tree_pss_bytes": self.peak["pss"],
            "peak_tree_anon_bytes": self.peak["anon"],
            "peak_tree_file_bytes": self.peak["file"],
            "peak_main_rss_bytes": self.peak["root_rss"],
            "peak_children_rss_bytes": self.peak["children_rss"],
            "peak_one_process_rss_bytes": self.peak["one_process_rss"],
            "max_processes": self.max_processes,
            "busy_child_processes": len(workers),
            "child_cpu_s": round(sum(self.cpu[p] for p in workers), 1),
            "rss_samples": self.samples,
        }
