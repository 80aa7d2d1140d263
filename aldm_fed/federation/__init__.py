"""Federation on Flower: the phase plan, what may leave a site, the phased strategy, site work, security and launch."""
