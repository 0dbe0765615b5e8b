"""An NTC thermistor to ground under a fixed resistor from the ADC's reference (β model).

The defaults are the common part: 10 kΩ at 25 °C, β 3950, under 10 kΩ from 3.3 V; a board
passes its own. An open or shorted sensor (a reading at a rail) gives None.
"""

# ruff: noqa: PLC0415
# `math` is imported when a temperature is computed: the module costs nothing more before.


def ntc_dc(adc_mv, vref_mv=3300, r_fixed=10000, r25=10000, beta=3950):
    """Temperature (d°C) of an NTC to ground under `r_fixed` from `vref_mv`, β model;
    None when the reading is at a rail (open or shorted sensor)."""
    import math

    if adc_mv <= 0 or adc_mv >= vref_mv:
        return None
    r = r_fixed * adc_mv / (vref_mv - adc_mv)
    t = 1 / (1 / 298.15 + math.log(r / r25) / beta)
    return round((t - 273.15) * 10)
