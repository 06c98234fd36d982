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


class DeviceMeans:
    """One log interval's running means, accumulated in device tensors: a training step adds
    to them without reading anything back to the host; :meth:`drain_into` reads them all in
    one transfer on a logging step and hands them to a :class:`MetricLogger`.

    ``add(key, total, count)`` sums; ``add_losses`` is GD's ``log_loss_dict`` (each loss
    term's mean and its mean per timestep quartile ``_q0``..``_q3``). Non-finite values (a
    step skipped for a NaN) are left out of the means, so one bad step does not make the
    interval's loss NaN; ``skipped_nonfinite`` counts such steps.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        # key → float64 tensor (0-d, or [4] for quartiles): float64, as GD's Python floats
        # (lg_loss_scale = 20.001 must log as 20.001); a few scalars, so the cost is nil.
        self._sums = {}
        self._counts = {}  # a tensor like the sum, or a Python number kept on the host

    def add(self, key, total, count=1):
        """Accumulate ``total`` (a device tensor) over ``count`` items into ``key``; a count
        that is a Python number stays on the host (a tensor made from it would be a blocking
        host→device copy on a GPU)."""
        total = total.detach().to(torch.float64)
        if key not in self._sums:
            self._sums[key] = torch.zeros_like(total)
            self._counts[key] = 0 if isinstance(count, (int, float)) else torch.zeros_like(total)
        self._sums[key].add_(total)
        if isinstance(self._counts[key], torch.Tensor):
            self._counts[key].add_(count)
        else:
            self._counts[key] += count

    def add_losses(self, num_timesteps, ts, losses):
        """GD's loss logging for one microbatch: ``losses`` {term: per-sample values}."""
        quartile = (4 * ts.detach().long() // num_timesteps).clamp_(0, 3)
        for key, values in losses.items():
            values = values.detach().double()
            finite = torch.isfinite(values)
            kept = torch.where(finite, values, torch.zeros_like(values))
            self.add(key, kept.sum(), finite.sum())
            by_q = torch.zeros(4, dtype=torch.float64, device=self.device)
            n_q = torch.zeros(4, dtype=torch.float64, device=self.device)
            self.add(f"{key}_q", by_q.scatter_add_(0, quartile, kept),
                     n_q.scatter_add_(0, quartile, finite.double()))

    def drain_into(self, logger):
        """Hand every accumulated mean to ``logger`` (one device→host read), then reset."""
        if not self._sums:
            return
        keys = list(self._sums)
        on_device = [k for k in keys if isinstance(self._counts[k], torch.Tensor)]
        values = iter(torch.cat([self._sums[k].reshape(-1) for k in keys]
                                + [self._counts[k].reshape(-1) for k in on_device]).tolist())
        sums = {k: [next(values) for _ in range(self._sums[k].numel())] for k in keys}
        counts = {k: ([next(values) for _ in range(self._sums[k].numel())] if k in on_device
                      else [self._counts[k]] * self._sums[k].numel()) for k in keys}
        for key in keys:
            width = len(sums[key])
            for j, (total, count) in enumerate(zip(sums[key], counts[key])):
                if count > 0:
                    logger.logkv_sum_count(f"{key}{j}" if width > 1 else key, total, count)
        self._sums.clear()
        self._counts.clear()
