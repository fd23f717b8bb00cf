"""Datasets: the toy world generator and readers/writers of the published formats."""
