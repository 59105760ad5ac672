"""Launch any stage locally or on SLURM (submitit). Imports every other package; none imports it."""
