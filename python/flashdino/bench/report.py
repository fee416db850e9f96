"""Where a benchmark result goes: one JSON with everything, one markdown table for people.

Every result carries the machine it ran on (CPU model and the ISA extensions that decide CPU
matmul speed, GPU, driver), the library versions, the date and the command, so a number in the
README can always be traced to its file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from ..variants import VARIANTS
from .backends import dispatch_explain
from .targets import fmt_target

__all__ = ["environment", "cpu_info", "device_tag", "environment_lines", "rate_line", "save", "fmt_rate", "loadavg",
           "render_markdown", "table_row", "ran_summary", "results_dir"]

# The CPU features that decide which matmul kernels a CPU can use (bf16 / int8 dot products, AMX tiles).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile",
             "amx_bf16", "amx_int8", "amx_fp16", "asimd", "sve", "sve2", "bf16", "i8mm")


def _version(module: str) -> Optional[str]:
    try:
        return getattr(__import__(module), "__version__", "?")
    except Exception:
        return None


def loadavg() -> Optional[list]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def cpu_info() -> dict:
    """CPU model name and ISA flags, from ``lscpu`` (else /proc/cpuinfo, else ``platform``)."""
    text = ""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                              env={**os.environ, "LC_ALL": "C"}).stdout
    except Exception:
        pass
    if "Model name" not in text:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            pass
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())  # features: Arm
    return dict(cpu=fields.get("model name") or platform.processor() or platform.machine(),
                cpu_isa=[f for f in ISA_FLAGS if f in flags])


def _gpu_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except Exception:
        pass
    try:
        v = torch._C._cuda_getDriverVersion()  # the CUDA driver API version, e.g. 12080
        return f"CUDA driver API {v // 1000}.{v % 1000 // 10}"
    except Exception:
        return None


def device_tag(device: torch.device) -> str:
    """Short device name for file names: ``cpu``, ``h100-80gb-hbm3``, ..."""
    if device.type != "cuda":
        return device.type
    name = re.sub(r"^nvidia\s+", "", torch.cuda.get_device_name(device).lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def environment(device: torch.device) -> dict:
    import flashdino

    env = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=str(device), device_tag=device_tag(device), python=sys.version.split()[0],
        platform=platform.platform(), machine=platform.machine(), **cpu_info(), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), cpu_capability=_cpu_capability(), loadavg_start=loadavg(),
        versions=dict(flashdino=flashdino.__version__, torch=torch.__version__, triton=_version("triton"),
                      transformers=_version("transformers"), timm=_version("timm"), cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None),
        flashdino_backend_env={k: v for k, v in os.environ.items() if k.startswith("FLASHDINO_BACKEND")},
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_sms=props.multi_processor_count,
                   driver=_gpu_driver(), allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   allow_tf32_cudnn=torch.backends.cudnn.allow_tf32)
    env["dispatch"] = dispatch_explain(device)
    return env


def _cpu_capability() -> Optional[str]:
    get = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return get() if get else None


def fmt_rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.2f} GFLOP/s"


def environment_lines(env: dict, command: Optional[str] = None) -> list[str]:
    """The markdown header every result file starts with: date, command, machine, versions, load."""
    lines = [f"- date (UTC): {env['date_utc']}"]
    if command:
        lines.append(f"- command: `{command}`")
    if env.get("gpu"):
        lines.append(f"- GPU: {env['gpu']} (sm {env['gpu_capability']}, {env['gpu_memory_gib']} GiB, "
                     f"{env['gpu_sms']} SMs), driver {env.get('driver')}, CUDA {env['versions']['cuda']}")
    isa = ", ".join(env.get("cpu_isa") or []) or "none of the tracked extensions"
    lines.append(f"- machine: {env['machine']}, CPU {env['cpu']} ({env['cpu_count']} logical CPUs, torch threads "
                 f"{env['torch_threads']}, {env.get('cpu_capability')}; ISA: {isa}), {env['platform']}")
    v = env["versions"]
    lines.append(f"- versions: flashdino {v['flashdino']}, torch {v['torch']}, triton {v['triton']}, "
                 f"transformers {v['transformers']}, timm {v['timm']}, python {env['python']}")
    lines.append(f"- load average (1/5/15 min): start {env.get('loadavg_start')}, end {env.get('loadavg_end')}")
    if env.get("flashdino_backend_env"):
        lines.append(f"- backend switches set in the environment: {env['flashdino_backend_env']}")
    return lines


def rate_line(when: str, rates: dict) -> str:
    parts = [f"{k} GEMM {fmt_rate(x['flops_per_s'])} (n={x['n']})" for k, x in rates.items()
             if isinstance(x, dict) and "flops_per_s" in x]
    if isinstance(rates.get("copy"), dict) and "bytes_per_s" in rates["copy"]:
        parts.append(f"copy {rates['copy']['bytes_per_s'] / 1e9:.1f} GB/s (read + write)")
    return f"device rates ({when}): " + ", ".join(parts)


def results_dir() -> Path:
    """``benchmarks/results`` of the checkout flashdino runs from, else ``./flashdino_bench_results``."""
    repo = Path(__file__).resolve().parents[3]
    if (repo / "benchmarks").is_dir() and (repo / "python" / "flashdino").is_dir():
        return repo / "benchmarks" / "results"
    return Path.cwd() / "flashdino_bench_results"


def save(result: dict, markdown: str, out_dir: Path, stem: str) -> list[str]:
    """Writes ``<stem>.json`` and ``<stem>.md``; each file is replaced whole, never left half-written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".json", json.dumps(result, indent=2, default=str) + "\n"), (".md", markdown + "\n")):
        path = out_dir / f"{stem}{suffix}"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        paths.append(str(path))
    return paths


# -- the end-to-end tables ---------------------------------------------------------------------------------
def _mib(v) -> str:
    return f"{v:.0f}" if v is not None else ""


def _note(row: dict) -> str:
    """The row's message, and which backend ran each op when flashdino's dispatch recorded it."""
    parts = [row["message"]] if row.get("message") else []
    if row.get("backends"):
        parts.append(f"ran: {ran_summary(row['backends'])}")
    return "; ".join(parts)


def ran_summary(ran: Optional[dict]) -> str:
    """``torch`` when every op ran on one backend, else ``op=backend`` per op."""
    if not ran:
        return "not recorded"
    names = set(ran.values())
    return names.pop() if len(names) == 1 else ", ".join(f"{op}={b}" for op, b in sorted(ran.items()))


def table_row(r: dict) -> str:
    """One row of the end-to-end tables (also the progress line of a run)."""
    sp = r.get("speedup", {})
    wall = r.get("timer") == "host wall clock" and r.get("samples", 0) > 1
    sp_min = r.get("speedup_min", {}) if wall else {}
    chk = r.get("check") or {}
    if r.get("status") == "ok" and "time_s" in r:
        cells = [f"{r['time_s'] * 1e3:.2f}" + (f" [{r['min_s'] * 1e3:.2f}]" if wall else ""),
                 f"{r['iqr_s'] * 1e3:.2f}" if r.get("iqr_s") is not None else "", f"{r['imgs_per_s']:.1f}",
                 *((f"{sp[p]:.2f}x" + (f" (min {sp_min[p]:.2f}x)" if p in sp_min else "")) if p in sp else ""
                   for p in ("hf", "hf-compile", "timm")),
                 (f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "")
                 + (f" ({r['mfu_same_load'] * 100:.1f}%)" if r.get("mfu_same_load") is not None else ""),
                 _mib(r.get("peak_mem_mib")),
                 "reference" if chk.get("reference") else (f"{chk['cos']:.6f}" if "cos" in chk else ""),
                 "" if chk.get("reference") else (f"{chk['rel_err']:.1e}" if "rel_err" in chk else ""), _note(r)]
    else:
        cells = [""] * 10 + [f"{r.get('status')}: {r.get('message', '')}"]
    name = r["model"] if r["depth"] == _full_depth(r["model"]) else f"{r['model']} (depth {r['depth']})"
    return f"| {name} | {r['res']} | {r['batch']} | {r['dtype']} | {r['peer']} | " + " | ".join(cells) + " |"


def render_markdown(result: dict) -> str:
    env, rows = result["environment"], result["rows"]
    lines = [f"# flashdino end-to-end benchmark: {env.get('gpu') or env['cpu']}", ""]
    lines += environment_lines(env, result["command"])
    if result.get("load_warning"):
        lines.append(f"- **{result['load_warning']}**")
    lines += [f"- {rate_line(when, r)}" for when, r in result["rates"].items()]
    lines.append("- MFU = model FLOPs / time / the highest GEMM rate measured in this run for the row's compute "
                 "dtype (bf16 for bf16 and amp rows, fp32 for fp32 rows; `F.linear` = the nn.Linear layout). "
                 "FLOPs of the ViT blocks plus the patch-embedding GEMM; training = 3x forward. "
                 "On a CPU the value in brackets is against GEMM probes run between the timed calls, i.e. under "
                 "the same load from other processes.")
    lines.append("- check: cosine similarity / relative L2 error of the output tokens against flashdino's "
                 "PyTorch path (every op forced to the `torch` backend) on the same input and weights. HF and timm "
                 "use fp32 RoPE periods, flashdino the official bf16-rounded ones: a small DINOv3 difference is expected. "
                 "HF DINOv2 interpolates its position table without the official 0.1 offset (differs below 518 px).")
    lines.append("- time: median over the timed calls, IQR = their inter-quartile range; "
                 + ("CUDA events per call (latency: host wall clock, synchronised per call); peak mem = the "
                    "most one call allocates above the resident weights and inputs." if env.get("gpu") else "time.perf_counter per call, peers interleaved call by call; "
                 "peak memory is not measured on a CPU."))
    lines.append("")
    for mode in ("inference", "latency", "training"):
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        unit = "latency (ms)" if mode == "latency" else "time / call (ms)"
        if any(r.get("timer") == "host wall clock" for r in mrows):
            unit += " median [min]"
        lines += [f"## {mode}", "",
                  f"| model | res | batch | dtype | peer | {unit} | IQR (ms) | img/s | vs HF | vs compile | vs timm | MFU | "
                  "peak mem (MiB) | cos | rel err | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [table_row(r) for r in mrows]
        lines.append("")
    if result.get("memory"):
        lines += ["## memory (largest square image at batch 1, inference)", "",
                  "| model | dtype | peer | largest size | tokens | first OOM size | note |", "|---|---|---|---|---|---|---|"]
        for m in result["memory"]:
            lines.append(f"| {m['model']} | {m['dtype']} | {m['peer']} | {m.get('max_size') or ''} | "
                         f"{m.get('tokens') or ''} | {m.get('first_oom') or ''} | {m.get('status')}: {m.get('message', '')} |")
        lines.append("")
    if result.get("targets"):
        lines += ["## targets", ""] + [fmt_target(t) for t in result["targets"]] + [""]
    if result.get("skipped"):
        lines += ["## skipped peers", ""] + [f"- {p}: {why}" for p, why in result["skipped"].items()] + [""]
    if result.get("notes"):
        lines += ["## notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def _full_depth(model: str) -> Optional[int]:
    cfg = VARIANTS.get(model)
    return cfg.depth if cfg else None
