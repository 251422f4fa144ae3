"""Launchers: run a per-shard stage beyond one machine by splitting it with ``--part i/N``.

``slurm`` writes (and submits) an sbatch array over the parts plus a dependent finalize job;
``finalize`` is what that job runs: the stage once more over every shard (nothing left to do but
check, and for ``shard`` write manifest.json), then the lineage of the array's tries is closed.
``stage_args`` turns a stage's command line into the one a cluster node runs.
"""
