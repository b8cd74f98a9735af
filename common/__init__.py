"""HT-2 (hierarchical Tucker-2) compression of CNNs: decomposition, layers, surgery, rank search and the experiment pipeline."""
