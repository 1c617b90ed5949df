"""Vectors: streaming polygons of class masks (`polygons`), ground areas of each class
(`areas`), and vector layers read and written through pyogrio (`layers`)."""
