"""Repository tools that are neither the library, its examples, its tests nor its benchmarks."""
