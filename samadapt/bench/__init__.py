"""``samadapt benchmark``: accuracy, prediction latency, training cost and 3D volume time, in one report."""
