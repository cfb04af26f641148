"""Exit statuses shared by the entry points. No imports, so a command line can name them in its ``--help``
before it loads torch (``study.runstate`` re-exports them)."""

# EX_TEMPFAIL (sysexits.h): "temporary failure, retry later". The status of a run stopped by SIGTERM / SIGUSR1
# after saving its state; any non-zero status fails the Snakemake job (torchrun turns it into 1), so the
# profile's `retries` reruns it and the rerun resumes from the saved state.
RETRY_EXIT = 75
