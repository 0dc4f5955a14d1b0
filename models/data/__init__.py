"""Datasets: synthderm (controlled, the embedded default), ISIC2019 and generic folders."""
