"""Console entry points (``mtp-preprocess``, ``mtp-export``, ...; see setup.py): argument parsing and one-sentence
errors around the library. ``tools/*.py`` are thin wrappers of these for a checkout without console scripts.
"""
import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option's help; the description and epilog kept as written."""
