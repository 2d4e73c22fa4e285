"""The intermediate representation, its canonical printers and the optimizer."""
