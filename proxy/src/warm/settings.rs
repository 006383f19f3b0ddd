//! The `warm` section as the warm daemon takes it: each image reference parsed once.

use crate::oci::ImageRef;

/// What the daemon warms, from the configuration (`warm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmSettings {
    /// Images this node's cache is filled with at start and whenever this list changes.
    pub images: Vec<ImageRef>,
}

/// A `warm` value that is no image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WarmSettingsError {
    #[error("{image:?}: {reason}")]
    Image {
        image: String,
        reason: crate::oci::ImageRefError,
    },
}

impl crate::config::SettingError for WarmSettingsError {
    fn key(&self) -> &'static str {
        match self {
            Self::Image { .. } => "warm.images",
        }
    }
}

impl TryFrom<&crate::config::Warm> for WarmSettings {
    type Error = WarmSettingsError;

    fn try_from(w: &crate::config::Warm) -> Result<Self, Self::Error> {
        let images = w
            .images
            .iter()
            .map(|image| {
                image.parse().map_err(|reason| WarmSettingsError::Image {
                    image: image.clone(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { images })
    }
}
