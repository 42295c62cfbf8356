"""Shared by the benchmark scripts."""
import subprocess


def commit() -> str:
    """Short hash of the checked-out commit (+uncommitted if tracked files differ), or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py", "*.yaml", "*.toml"],
                               capture_output=True, text=True).stdout.strip()  # code or configs, not docs
        return (out.stdout.strip() + ("+uncommitted" if dirty else "")) if out.stdout.strip() else "unknown"
    except OSError:
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or platform.processor(): run-level results of discrete
    optimisations (DEXTER's Gumbel argmax) can differ between CPU models through float rounding."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
