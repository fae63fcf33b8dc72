"""The crossbar stage: a converted map laid onto crossbar tiles and simulated there.

- :mod:`~maptools.crossbar.mapping`: tiling, cell slicing, weight encoding, bit-serial inputs, the ADC;
- :mod:`~maptools.crossbar.evaluation`: what the crossbars lose against the integer simulation.
"""
