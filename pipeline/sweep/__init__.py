"""Sweeps: a sweep file's trials run by Ray Tune and recorded in MLflow.

spec (the sweep file, validated and expanded into trials) -> cli (the command) -> driver (one
launch: Ray, Ray Tune) -> trial (in a Ray worker) -> recorder (the driver's MLflow runs).
"""
