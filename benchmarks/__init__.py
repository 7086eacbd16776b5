"""Speed benchmarks of wnplan, run side by side with the naive way in one process.

Run `python -m benchmarks` from the repository root to list them, and
`python -m benchmarks NAME [OPTIONS]` to run one (for example `python -m benchmarks profile --quick`).
"""
