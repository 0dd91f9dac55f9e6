"""Synthetic motion blur over offline photos: paired training shards and blurry clips (`adarevd synth`)."""
