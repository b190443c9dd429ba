"""Print castore benchmark results as ratios to the baselines of the same run.

Usage: python bench/compare.py bench/results/latest.json

Shared machines are noisy, so the numbers that matter are ratios of castore to a
baseline timed in the same process on the same bytes; absolute medians are printed for
context.  Output is Markdown, ready to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import json
import sys

MB = 1e6

# (castore case, baseline case, what the ratio says)
RATIOS = [
    ("castore_full_save", "write_and_fsync", "full save vs raw write+fsync of the same bytes"),
    ("castore_full_save", "savez_and_fsync", "full save vs np.savez+fsync"),
    ("castore_incremental_save", "write_and_fsync", "1%-rows incremental save vs raw write+fsync of everything"),
    (
        "castore_incremental_save",
        "castore_full_save",
        "1%-rows incremental save (untracked, fingerprints) vs full save",
    ),
    ("castore_tracked_save_0pct", "castore_full_save", "tracked save, nothing changed, vs full save"),
    ("castore_tracked_save_1pct", "castore_full_save", "tracked save, 1% of replay rows new, vs full save"),
    ("castore_tracked_save_10pct", "castore_full_save", "tracked save, 10% of replay rows new, vs full save"),
    ("castore_tracked_save_100pct", "castore_full_save", "tracked save, 100% of replay rows new, vs full save"),
    ("castore_hash", "blake3_auto", "castore chunk hashing vs bare multi-threaded BLAKE3, same bytes"),
    ("castore_gc_4x", "castore_gc_1x", "GC freeing the same bytes from a store 4x larger vs 1x"),
    ("castore_full_save", "blake3_thread_pool", "full save vs bare BLAKE3 of everything"),
    ("castore_load_step", "npz_load_all", "load step (verified) vs np.load of one .npz"),
    ("castore_load_step_unverified", "npz_load_all", "load step (verify=False) vs np.load of one .npz"),
    ("castore_load_step", "blake3_thread_pool", "load step (verified) vs bare BLAKE3 of everything"),
    ("castore_load_component", "npz_load_component", "load one component vs np.load of its arrays"),
    ("castore_verify", "blake3_thread_pool", "verify() of the whole store vs bare BLAKE3 of everything"),
    ("castore_verify_5pct", "castore_verify", "verify(sample=0.05) vs verify() of everything"),
]
BASELINES = [
    "write_and_fsync",
    "savez_and_fsync",
    "npz_load_all",
    "npz_load_component",
    "blake3_one_thread",
    "blake3_thread_pool",
    "blake3_auto",
]
SWEEP_CASES = ["sweep_full_save", "sweep_incremental_contiguous", "sweep_incremental_scattered", "sweep_load"]


def load_results(path: str) -> tuple[dict, dict, dict]:
    """(run info, {case: benchmark}, {(case, chunk_bytes): benchmark}) from a JSON file."""
    with open(path) as f:
        data = json.load(f)
    by_case, sweep = {}, {}
    for bench in data["benchmarks"]:
        case = bench["extra_info"].get("case", bench["name"])
        if case.startswith("sweep_"):
            sweep[(case, bench["extra_info"]["chunk_bytes"])] = bench
        else:
            by_case[case] = bench
    return data, by_case, sweep


def median(bench: dict) -> float:
    return bench["stats"]["median"]


def gbps(bench: dict) -> str:
    nbytes = bench["extra_info"].get("bytes")
    return f"{nbytes / median(bench) / 1e9:.2f}" if nbytes else "-"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def ratio(a: dict | None, b: dict | None) -> str:
    return f"{median(a) / median(b):.2f}" if a and b else "-"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_table(by_case: dict) -> str:
    rows = []
    for case, base, meaning in RATIOS:
        a, b = by_case.get(case), by_case.get(base)
        if a and b:
            rows.append([meaning, f"**{ratio(a, b)}**", ms(median(a)), gbps(a), ms(median(b)), gbps(b)])
    header = ["comparison", "time ratio", "castore ms", "castore GB/s", "baseline ms", "baseline GB/s"]
    return table(header, rows)


def hashing_line(by_case: dict) -> str:
    """castore's hashing throughput against bare multi-threaded BLAKE3 (target >= 0.8)."""
    castore, bare = by_case.get("castore_hash"), by_case.get("blake3_auto")
    if not (castore and bare):
        return ""
    return (
        f"castore hashing throughput / bare multi-threaded BLAKE3 throughput: "
        f"**{median(bare) / median(castore):.2f}** (target >= 0.8; {gbps(castore)} vs {gbps(bare)} GB/s)"
    )


def baseline_table(by_case: dict) -> str:
    rows = [
        [case, ms(median(by_case[case])), gbps(by_case[case]), str(by_case[case]["stats"]["rounds"])]
        for case in BASELINES
        if case in by_case
    ]
    return table(["baseline", "median ms", "GB/s", "rounds"], rows)


def dedup_table(by_case: dict) -> str:
    rows = []
    for case in (
        "castore_full_save",
        "castore_incremental_save",
        "castore_tracked_save_0pct",
        "castore_tracked_save_1pct",
        "castore_tracked_save_10pct",
        "castore_tracked_save_100pct",
    ):
        info = by_case.get(case, {}).get("extra_info")
        if info:
            rows.append(
                [
                    case,
                    f"{info['bytes'] / MB:.1f}",
                    f"{info['changed_bytes'] / MB:.2f}",
                    f"{info['new_bytes'] / MB:.2f}",
                    f"{info['write_amplification']:.2f}" if info["write_amplification"] is not None else "-",
                    f"{info['new_chunks']:.1f}",
                    f"{info['reused_chunks']:.1f}",
                ]
            )
    header = ["save", "logical MB", "changed MB", "new MB", "write amp.", "new chunks", "reused chunks"]
    return table(header, rows)


def sweep_rows(sweep: dict):
    """Yield (chunk label, full, contiguous, scattered, load) per chunk size, ascending."""
    for chunk_bytes in sorted({cb for _, cb in sweep}):
        yield (f"{chunk_bytes >> 10} KiB", *(sweep.get((case, chunk_bytes)) for case in SWEEP_CASES))


def sweep_time_table(sweep: dict, by_case: dict) -> str:
    raw, npz_load = by_case.get("write_and_fsync"), by_case.get("npz_load_all")
    rows = []
    for chunk, full, contiguous, scattered, load in sweep_rows(sweep):
        row = [chunk]
        for bench, base in ((full, raw), (contiguous, raw), (scattered, raw), (load, npz_load)):
            row += [ms(median(bench)), f"**{ratio(bench, base)}**"] if bench else ["-", "-"]
        rows.append(row)
    header = [
        "chunk",
        "full save ms",
        "/ raw",
        "incr. contiguous ms",
        "/ raw",
        "incr. scattered ms",
        "/ raw",
        "load ms",
        "/ np.load",
    ]
    return table(header, rows)


def sweep_dedup_table(sweep: dict) -> str:
    rows = []
    for chunk, full, contiguous, scattered, _ in sweep_rows(sweep):
        row = [chunk, f"{full['extra_info']['new_chunks']:.0f}" if full else "-"]
        for bench in (contiguous, scattered):
            info = bench["extra_info"] if bench else None
            row += [f"{info['new_bytes'] / MB:.2f}", f"**{info['write_amplification']:.1f}**"] if info else ["-", "-"]
        rows.append(row)
    header = [
        "chunk",
        "chunks in a full save",
        "contiguous new MB",
        "contiguous WA",
        "scattered new MB",
        "scattered WA",
    ]
    return table(header, rows)


def changed_bytes_note(sweep: dict) -> str:
    infos = [b["extra_info"] for (case, _), b in sweep.items() if case.startswith("sweep_incremental")]
    if not infos:
        return ""
    return (
        f"Each incremental save changes {infos[0]['changed_bytes'] / MB:.2f} MB of "
        f"{infos[0]['bytes'] / MB:.1f} MB (1% of replay rows); WA = new bytes / changed bytes."
    )


def main(path: str) -> None:
    data, by_case, sweep = load_results(path)
    machine = data["machine_info"]
    print(
        f"# castore benchmarks ({data['datetime']}, {machine['node']}, "
        f"{machine['cpu'].get('brand_raw', machine['processor'])}, Python {machine['python_version']})"
    )
    print("\nTime ratio = castore median / baseline median, same run, same bytes (lower is better).\n")
    print(ratio_table(by_case))
    print("\n" + hashing_line(by_case))
    print("\n## Deduplication at the default chunk size\n")
    print(dedup_table(by_case))
    print("\n## Baselines (absolute medians, for context)\n")
    print(baseline_table(by_case))
    if sweep:
        print("\n## Chunk-size sweep\n")
        print(changed_bytes_note(sweep))
        print("Ratios are against the raw write+fsync and np.load baselines above.\n")
        print(sweep_time_table(sweep, by_case))
        print()
        print(sweep_dedup_table(sweep))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[2])
    main(sys.argv[1])
