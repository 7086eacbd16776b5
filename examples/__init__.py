"""Example classifiers for wnplan and the script that trains and exports them."""
