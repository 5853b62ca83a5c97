"""Human-facing outputs: thumbnails with tissue contours and patches, tissue GeoJSON for QuPath,
and the visual reports of later stages."""
