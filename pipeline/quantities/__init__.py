"""The quantities: one module per quantity, each defining a ``Quantity`` unit (``_base.py``);
``registry`` lists them and is what the rest of the product asks. The package itself imports
nothing, so that a unit's module can import the protocol and its siblings without a cycle."""
