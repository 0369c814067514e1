"""Prediction latency of every method against the stock LiteMedSAM forward: ``samadapt.bench.latency``."""

from samadapt.bench.latency import main

if __name__ == "__main__":
    main()
