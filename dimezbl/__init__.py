"""Drivers of the DimezblNet companion: experiments, statistics and reports built on the model core
`dimezbl_core` (imported, never importing back)."""
