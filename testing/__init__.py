"""Test infrastructure that is part of the product: real multi-host clusters on one machine (`hosts`)."""
