"""Teacher-logit workflow: the Python behind the Snakemake rules, and the reader.

Importing this package imports nothing heavy; torch is imported only by the
modules that run the teacher.
"""
