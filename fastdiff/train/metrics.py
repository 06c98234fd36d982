"""Training metrics with GD's keys: running means per log interval, averaged over ranks,
written to stdout (GD's table), progress.csv and metrics.jsonl in the log dir.

A resumed run appends to the existing files (GD truncates them).
"""
import csv
import json
import os

import torch
import torch.distributed as dist


def _print_stdout(text):
    print(text, flush=True)


class MetricLogger:
    """Collects one log interval's metrics; :meth:`dumpkvs` writes them.

    ``table_writer`` receives GD's table as text (default: printed to stdout); None: no table.
    """

    def __init__(self, log_dir, rank=0, table_writer=_print_stdout):
        self.rank = rank
        self.table_writer = table_writer
        self._sums = {}
        self._counts = {}
        self._values = {}
        self.csv_path = os.path.join(log_dir, "progress.csv") if log_dir else None
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl") if log_dir else None
        self._csv_keys = self._existing_csv_keys()

    def _existing_csv_keys(self):
        if self.rank != 0 or not self.csv_path or not os.path.exists(self.csv_path):
            return []
        with open(self.csv_path, newline="") as f:
            header = next(csv.reader(f), [])
        return header

    def logkv(self, key, value):
        """Record the last value of ``key`` for this interval."""
        self._values[key] = float(value)

    def logkv_mean(self, key, value, count=1):
        """Accumulate ``value`` (a mean over ``count`` items) into the interval mean of ``key``."""
        self._sums[key] = self._sums.get(key, 0.0) + float(value) * count
        self._counts[key] = self._counts.get(key, 0) + count

    def logkv_sum_count(self, key, total, count):
        """Accumulate an already-summed ``total`` over ``count`` items (no per-item sync)."""
        self._sums[key] = self._sums.get(key, 0.0) + float(total)
        self._counts[key] = self._counts.get(key, 0) + count

    def _reduce_across_ranks(self):
        """Count-weighted means over all ranks (GD's mpi_weighted_mean), keys unioned."""
        means = {k: (self._sums[k], self._counts[k]) for k in self._sums}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, means)
            merged = {}
            for part in gathered:
                for k, (s, c) in part.items():
                    ms, mc = merged.get(k, (0.0, 0))
                    merged[k] = (ms + s, mc + c)
            means = merged
        return {k: s / c for k, (s, c) in means.items() if c > 0}

    def dumpkvs(self):
        """Write the interval's metrics (rank 0) and start a new interval. Collective."""
        kvs = self._reduce_across_ranks()
        kvs.update(self._values)
        self._sums.clear()
        self._counts.clear()
        self._values.clear()
        if self.rank == 0 and kvs:
            if self.table_writer is not None:
                self.table_writer(self._format_table(kvs))
            self._write_csv(kvs)
            self._write_jsonl(kvs)
        return kvs

    @staticmethod
    def _format_table(kvs):
        rows = []
        for k in sorted(kvs, key=str.lower):
            v = kvs[k]
            rows.append((k[:30], ("%-8.3g" % v)[:30]))
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        dashes = "-" * (kw + vw + 7)
        lines = [dashes] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [dashes]
        return "\n".join(lines)

    def _write_csv(self, kvs):
        if not self.csv_path:
            return
        new_keys = sorted(set(kvs) - set(self._csv_keys))
        if new_keys:
            # A key appeared: rewrite the file with the wider header (rows keep their values).
            old_rows = []
            if os.path.exists(self.csv_path):
                with open(self.csv_path, newline="") as f:
                    old_rows = list(csv.DictReader(f))
            self._csv_keys = self._csv_keys + new_keys
            tmp = self.csv_path + ".tmp"
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self._csv_keys)
                writer.writeheader()
                writer.writerows(old_rows)
            os.replace(tmp, self.csv_path)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._csv_keys).writerow(
                {k: kvs.get(k, "") for k in self._csv_keys})

    def _write_jsonl(self, kvs):
        if not self.jsonl_path:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(kvs, sort_keys=True) + "\n")


def log_loss_dict(logger, num_timesteps, ts, losses):
    """GD's loss logging: the mean of each term and its mean per timestep quartile (_q0.._q3).

    One host transfer per term for the whole batch instead of GD's per-sample loop.
    """
    quartile = (4 * ts.detach().to("cpu", torch.long) // num_timesteps).clamp_(0, 3)
    for key, values in losses.items():
        v = values.detach().float().cpu()
        logger.logkv_mean(key, v.mean().item())
        for q in range(4):
            mask = quartile == q
            n = int(mask.sum())
            if n:
                logger.logkv_sum_count(f"{key}_q{q}", v[mask].sum().item(), n)
