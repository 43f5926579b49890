"""edgekd: distill a fine-tuned teacher into a small student, compress, export, benchmark, report."""
__version__ = "0.1.0"
