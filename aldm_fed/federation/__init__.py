"""Federation on Flower: the coordinator's phases, what may leave a site (sharing), the phased
FedAvg strategy, the site's work, global models on disk, security and the process launchers."""
