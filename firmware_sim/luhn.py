"""Luhn (mod 10) check digits, as on ICCIDs (ITU-T E.118) and IMEIs."""

from __future__ import annotations


def check_digit(digits: str) -> str:
    """The Luhn digit to append to `digits` so the whole number validates."""
    if not digits.isdigit():
        raise ValueError(f"Luhn needs decimal digits, got {digits!r}")
    total = 0
    # Counting from the right of the finished number the check digit sits at position 1,
    # so the rightmost payload digit is the first one doubled.
    for pos, ch in enumerate(reversed(digits)):
        d = int(ch)
        if pos % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str(-total % 10)


def is_valid(number: str) -> bool:
    """True when `number` is all digits and its last digit is the Luhn check digit."""
    return len(number) >= 2 and number.isdigit() and check_digit(number[:-1]) == number[-1]
