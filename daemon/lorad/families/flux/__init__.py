"""FLUX.1 (dev and schnell): the first flow-matching transformer family."""
