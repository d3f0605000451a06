//! The standard SSD priors, generated on the host as the reference's
//! `generate_ssd_priors` does, so that a model's priors are one call.
//!
//! Per feature map, per cell (rows outer, columns inner), in this order: the
//! small square (`min` size), the big square (`sqrt(min * max)`), then for
//! each aspect ratio `r` the small box stretched to `(w * sqrt(r), h / sqrt(r))`
//! and `(w / sqrt(r), h * sqrt(r))`. Everything is computed in f64 (Python
//! floats, as the reference) and rounded to f32 once; then, with `clamp`
//! (as [`ssdlite300`] and [`ssd300`] use), clamped to `[0, 1]`. The result
//! is bit-identical to the reference's float32 priors.

/// The box sizes of one feature map, in pixels of the input image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxSizes {
    /// Side of the small square prior.
    pub min: f64,
    /// With `min`, gives the big square's side `sqrt(min * max)`.
    pub max: f64,
}

/// One feature map of an SSD head (the reference's `SSDSpec`).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMapSpec {
    /// Cells per side (the map is square).
    pub feature_map_size: u32,
    /// Input pixels per cell (the map's stride).
    pub shrinkage: u32,
    /// Square prior sizes.
    pub box_sizes: BoxSizes,
    /// Aspect ratios besides 1; each adds two priors per cell.
    pub aspect_ratios: Vec<f64>,
}

impl FeatureMapSpec {
    /// A spec from the reference's `SSDSpec(size, shrinkage, SSDBoxSizes(min, max), ratios)`.
    pub fn new(
        feature_map_size: u32,
        shrinkage: u32,
        min: f64,
        max: f64,
        aspect_ratios: &[f64],
    ) -> Self {
        Self {
            feature_map_size,
            shrinkage,
            box_sizes: BoxSizes { min, max },
            aspect_ratios: aspect_ratios.to_vec(),
        }
    }

    /// Priors this map contributes: `size^2 * (2 + 2 * ratios)`.
    pub fn num_priors(&self) -> usize {
        let cells = self.feature_map_size as usize * self.feature_map_size as usize;
        cells * (2 + 2 * self.aspect_ratios.len())
    }
}

/// The SSDLite-300 / MobileNet SSD feature maps (the reference's MobileNet
/// configs): 3000 priors.
pub fn ssdlite300_specs() -> Vec<FeatureMapSpec> {
    vec![
        FeatureMapSpec::new(19, 16, 60.0, 105.0, &[2.0, 3.0]),
        FeatureMapSpec::new(10, 32, 105.0, 150.0, &[2.0, 3.0]),
        FeatureMapSpec::new(5, 64, 150.0, 195.0, &[2.0, 3.0]),
        FeatureMapSpec::new(3, 100, 195.0, 240.0, &[2.0, 3.0]),
        FeatureMapSpec::new(2, 150, 240.0, 285.0, &[2.0, 3.0]),
        FeatureMapSpec::new(1, 300, 285.0, 330.0, &[2.0, 3.0]),
    ]
}

/// The SSD300 (VGG16) feature maps: 8732 priors.
pub fn ssd300_specs() -> Vec<FeatureMapSpec> {
    vec![
        FeatureMapSpec::new(38, 8, 30.0, 60.0, &[2.0]),
        FeatureMapSpec::new(19, 16, 60.0, 111.0, &[2.0, 3.0]),
        FeatureMapSpec::new(10, 32, 111.0, 162.0, &[2.0, 3.0]),
        FeatureMapSpec::new(5, 64, 162.0, 213.0, &[2.0, 3.0]),
        FeatureMapSpec::new(3, 100, 213.0, 264.0, &[2.0]),
        FeatureMapSpec::new(1, 300, 264.0, 315.0, &[2.0]),
    ]
}

/// SSDLite-300's 3000 priors, `[P, 4]` center form, flattened.
pub fn ssdlite300() -> Vec<f32> {
    generate(&ssdlite300_specs(), 300, true)
}

/// SSD300's 8732 priors, `[P, 4]` center form, flattened.
pub fn ssd300() -> Vec<f32> {
    generate(&ssd300_specs(), 300, true)
}

/// The priors of `specs` for a square input of `image_size` pixels,
/// `[P, 4]` center form `(cx, cy, w, h)` relative to the image, flattened;
/// `clamp` limits every value to `[0, 1]` as the reference's default does.
///
/// ```
/// use multibox::targets::priors;
/// assert_eq!(priors::ssdlite300().len(), 3000 * 4);
/// assert_eq!(priors::ssd300().len(), 8732 * 4);
/// ```
pub fn generate(specs: &[FeatureMapSpec], image_size: u32, clamp: bool) -> Vec<f32> {
    let total: usize = specs.iter().map(FeatureMapSpec::num_priors).sum();
    let mut out = Vec::with_capacity(total * 4);
    let image = f64::from(image_size);
    let mut push = |cx: f64, cy: f64, w: f64, h: f64| {
        for v in [cx, cy, w, h] {
            // One rounding to f32, then the clamp (exact: 0 and 1 are f32).
            let v = v as f32;
            out.push(if clamp { v.clamp(0.0, 1.0) } else { v });
        }
    };
    for spec in specs {
        let scale = image / f64::from(spec.shrinkage);
        let small = spec.box_sizes.min / image;
        let big = (spec.box_sizes.max * spec.box_sizes.min).sqrt() / image;
        for j in 0..spec.feature_map_size {
            for i in 0..spec.feature_map_size {
                let cx = (f64::from(i) + 0.5) / scale;
                let cy = (f64::from(j) + 0.5) / scale;
                push(cx, cy, small, small);
                push(cx, cy, big, big);
                for &ratio in &spec.aspect_ratios {
                    let r = ratio.sqrt();
                    push(cx, cy, small * r, small / r);
                    push(cx, cy, small / r, small * r);
                }
            }
        }
    }
    out
}
