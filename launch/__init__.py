"""Launchers: SLURM multi-node scripts and a local torchrun launcher (they only run `polar` CLIs)."""
