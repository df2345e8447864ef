"""Run an edanb grid on a Slurm cluster: each worker is one Slurm job with one GPU that runs one grid cell at a time.

    python experiments/slurm.py experiments/study.yaml --results /shared/runs/study --workers 8 --account myproject

The workers run the cells with papermill in this same environment (`sys.executable`), so the environment and the data,
cache and results folders must be on a file system that the compute nodes share. Every cell runs in the folder this
script was started from, so start it in a shared folder, or use absolute paths in the grid (`--set data=/shared/UBFC-Phys`;
setting `cache` would collapse a grid that compares caches). The script stays in the foreground until the grid is done
and then releases the jobs; run it again to resume (finished cells are skipped, a cell cut off by the wall time
resumes from its last epoch). PBS, LSF, SGE: the same with `dask_jobqueue.PBSCluster` etc.
"""
import argparse
import sys

from dask_jobqueue import SLURMCluster

from edanb.experiment import parse_overrides, run_grid


def slurm_cluster(account: str | None = None,  # Slurm account (--account)
                  queue: str | None = None,    # partition (--partition)
                  cpus: int = 8,               # CPUs per job: data loading and torch threads of its one cell
                  memory: str = "64GB",        # memory per job
                  gpus: int = 1,               # GPUs per job (0: CPU only)
                  walltime: str = "12:00:00",  # per job; a cell still running then resumes on the next run
                 ) -> SLURMCluster:
    "A Dask cluster whose workers are Slurm jobs, each one process with one thread: one grid cell at a time."
    return SLURMCluster(account=account, queue=queue, cores=1, processes=1, job_cpu=cpus, memory=memory,
                        walltime=walltime, job_extra_directives=[f"--gres=gpu:{gpus}"] if gpus else [],
                        python=sys.executable)


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("grid"); args.add_argument("--results", required=True)
    args.add_argument("--workers", type=int, default=4, help="Slurm jobs (cells at a time)")
    args.add_argument("--account"); args.add_argument("--queue")
    args.add_argument("--cpus", type=int, default=8); args.add_argument("--memory", default="64GB")
    args.add_argument("--gpus", type=int, default=1); args.add_argument("--walltime", default="12:00:00")
    args.add_argument("--set", action="append", metavar="KEY=VALUE", help="as `edanb run --set`")
    a = args.parse_args(argv)
    with slurm_cluster(a.account, a.queue, a.cpus, a.memory, a.gpus, a.walltime) as cluster:
        cluster.scale(jobs=a.workers)
        table = run_grid(a.grid, a.results, scheduler=cluster.scheduler_address, overrides=parse_overrides(a.set))
    print(table.to_string(index=False))
    return int((table.status == "failed").any())


if __name__ == "__main__":
    sys.exit(main())
