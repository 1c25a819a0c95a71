"""gradcam-batch-report: one self-contained HTML page about an output folder.

    gradcam-batch-report OUTPUT_DIR [--out FILE.html] [--per-gallery N] [--max-classes N] [--layer NAME]
                         [--no-images] [--no-strategies] [--strategies-top N] [--strategies-neighbors N]
                         [--strategies-max-clusters N] [--strategies-min-maps N] [--strategies-grid GRID]
                         [--strategies-max-exact N] [--strategies-workers N] [--compare OTHER_DIR]
    python -m gradcam_batch.report OUTPUT_DIR

The page holds a run summary, a per-class table, the class-mean maps, the strategies, galleries
(highest and lowest confidence, most border-focused maps, pointing-game misses) and the error
rows. It needs nothing but itself: no network, no external CSS or script, every picture inlined
as a data: URI, the scatter plots inline SVG.

Strategies (spectral relevance analysis, SpRAy): by default the command clusters each class's
rank-0 maps of the report's layer (strategies.find_strategies, which writes strategies.parquet and
strategies_classes.parquet beside cams/; --no-strategies: neither, and no section) and ranks the
report's classes by how strongly their maps split: those of two or more clusters with a tight one
first, then by eigengap, then by the share of the smallest tight cluster. Tightness: the
root-mean-square distance of a cluster's maps to their mean over that of the class's maps to the
class mean (maps on the clustering's grid, scaled to sum 1); tight: at most 0.5 and at most 0.7
times the median of the class's clusters. The top classes (--strategies-top, 5; at most 20) show
their clusters side by side: size and share, mean map, exemplars (the maps nearest the mean, as
gallery cards), the cluster's mean border_mass, centre of mass and entropy against the main
(largest) cluster's, and the spectral embedding coloured by cluster. These come from one more
streaming pass over the maps of the report's classes (sums per cluster, a bounded seeded sample
per cluster for the exemplars). The other --strategies-* flags are StrategyOptions' fields; a bad
value is one line, exit 2; without scikit-learn or SciPy, stderr and the page say so in one line
and the rest of the report is written. From Python, build_report(strategies=StrategyOptions())
asks for them (its default is none).

Scale: the maps are never loaded all at once. The per-class statistics and the choice of the
gallery rows read only the small columns (in DuckDB's SQL when DuckDB is importable, else in
pyarrow record batches); the maps themselves are read once, part file by part file in record
batches, to add up the class means and pick out the few gallery maps. Peak memory follows the
size of a record batch, not of the output.

Gallery cards of rows with a heatmap_png (output.heatmap_png: the run's map blended over the
crop) show that picture and need no dataset. The others' images are read back from the dataset
the run read (the manifest's `data` config, with the preprocessing it recorded), only from the
shards that hold the wanted samples, and decoded with the run's own resize and crop, so each map
lies over exactly the pixels it explains. When the data cannot be read any more, those cards
show the maps alone and the page says why.

Cross-check (--compare OTHER_DIR, crosscheck.py): the rank-0 maps paired with those another run
made of the same images and classes, typically with a method of another kind (eigencam or fem
without gradients, scorecam or ablationcam by perturbation); each pair rated by the correlation
of its maps, per class, per strategy cluster and the most disputed pairs in a Cross-check
section, every pair in crosscheck.parquet beside cams/.

An output folder may come from someone else, and the page is made to be shared, so the folder
decides nothing it has not proven. Images (and an ImageFolder's class names) are read only from
the shards the manifest's listing names, and only once the files still match it: a tar or
Parquet shard's path, size and modification time; an ImageFolder shard's names, labels, sizes
and modification times, listed again; and each image's bytes must hash to the image_digest its
rows record (a same-size replacement with its time restored is caught too). A card whose sample
the listing does not name, or whose shard or bytes fail the check, shows the map alone with the
reason; stderr and the page name the data
read, and --no-images reads none. Only the tool's part files are counted (source: the names
writer.part_name gives, the units of the listing, the tool's metadata and columns, rows of their
own shard); the others in cams/ and errors/ are named as not read. A manifest that is not an
object of objects, or over 64 MiB, and --per-gallery or --max-classes past their ceilings are
one line, exit code 2.

The layer reported on (--layer, else the one the run summary speaks of: the fused maps, else the
last target layer, as recorded in the manifest or the part files' metadata) is named with every
number of it. All-zero maps (no positive evidence: cam_max_raw = 0, else every value 0; a model
with a zero head gives only such maps) are counted in the summary and per class, warned about
at the top of the page when they are most of the maps, and left out of the galleries, the class
means and the statistics they have no value of (peak, box overlap, border mass, entropy). A
gallery whose cards share one value, or whose cut splits equal values, says that this is no
ranking. Gallery cards mark the samples whose label differs from the prediction.

Columns that newer runs add (pred_class, pointing_hit, border_mass, entropy, box_energy, box_iou,
confidence_change, heatmap_png) are used where the part files have them; the page says which
sections need a column the output lacks.

The package, by what each module holds:
    source      the output folder: manifest, part files, schema; ReportError; batch reading
    queries     the small columns: per-class statistics and gallery rows (DuckDB or pyarrow), errors
    maps        the streaming pass over the maps: class means, the gallery rows' maps and heatmaps
    listing     which data may be read back: the listing's shards, checked against the files as they are
    images      gallery images read back from the dataset as the run decoded them
    pictures    colour scale, upsampling, overlays, stored PNGs, data: URIs
    spectral    SpRAy's method on one class's maps (kNN graph, eigengap, KMeans); StrategyOptions
    strategies  SpRAy of an output folder: the pass, classes in parallel, strategies*.parquet
    strategies_page  the Strategies section: the pass over the shown classes' clusters, the ranking, its HTML
    crosscheck  --compare: the maps paired with another output's and rated, crosscheck.parquet
    crosscheck_page  the Cross-check section's HTML
    page        the HTML sections and the page
    style       the page's style sheet
    build       build_report: from the folder to the written page; the options' ceilings
    cli         argument parsing and main
"""

from gradcam_batch.report.build import Report, build_report
from gradcam_batch.report.crosscheck import CrossCheck, cross_check
from gradcam_batch.report.cli import main, parser
from gradcam_batch.report.images import Images, data_config, read_images
from gradcam_batch.report.maps import MapScan, scan_maps
from gradcam_batch.report.page import render
from gradcam_batch.report.pictures import colormap, data_uri, heatmap, overlay, stored_picture, upsample
from gradcam_batch.report.queries import (GALLERIES, MEAN_COLUMNS, ClassStats, Overview, _duckdb_importable,
                                          overview_arrow, overview_duckdb, read_errors)
from gradcam_batch.report.source import (ERROR_COLUMNS, OPTIONAL_COLUMNS, PROG, REQUIRED_COLUMNS, ReportError,
                                         Source, open_output)

__all__ = [
    "ERROR_COLUMNS", "GALLERIES", "MEAN_COLUMNS", "OPTIONAL_COLUMNS", "PROG", "REQUIRED_COLUMNS",
    "ClassStats", "CrossCheck", "Images", "MapScan", "Overview", "Report", "ReportError", "Source",
    "_duckdb_importable", "build_report", "colormap", "cross_check", "data_config", "data_uri", "heatmap", "main", "open_output",
    "overlay", "overview_arrow", "overview_duckdb", "parser", "read_errors", "read_images", "render", "scan_maps",
    "stored_picture", "upsample",
]
