"""Building blocks: plain nn.Modules and functions, one concept per file."""
