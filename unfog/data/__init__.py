"""Datasets: the procedural shapes-v1 world and image+caption folders."""
