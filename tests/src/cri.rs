//! A small CRI client: the image calls of `runtime.v1.ImageService`, the service the kubelet
//! uses, over containerd's unix socket. With CRI the containerd daemon fetches the image itself,
//! the path a node takes for `imagePullPolicy: Always`.
//!
//! The messages are written here by hand with only the fields these tests use; field numbers
//! and the service name follow the published CRI API (`k8s.io/cri-api`, `runtime/v1`), and
//! protobuf ignores the fields a side does not know.

use std::{path::Path, time::Duration};

use hyper_util::rt::TokioIo;
use tonic::{
    Request, Status,
    client::Grpc,
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint, Uri},
};
use tonic_prost::ProstCodec;

/// `ImageSpec`: an image reference.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

/// `AuthConfig`: the registry credentials the kubelet passes from an image pull secret.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthConfig {
    #[prost(string, tag = "1")]
    pub username: String,
    #[prost(string, tag = "2")]
    pub password: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    #[prost(message, optional, tag = "2")]
    pub auth: Option<AuthConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageResponse {
    /// The image id containerd assigned (`sha256:<config digest>`).
    #[prost(string, tag = "1")]
    pub image_ref: String,
}

/// `Image`: what the runtime knows about a stored image.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, repeated, tag = "2")]
    pub repo_tags: Vec<String>,
    /// `name@sha256:<manifest or index digest>`: the digest the image was pulled as.
    #[prost(string, repeated, tag = "3")]
    pub repo_digests: Vec<String>,
    #[prost(uint64, tag = "4")]
    pub size: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageStatusRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub image: Option<Image>,
}

/// `ListImagesRequest` without a filter.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListImagesRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListImagesResponse {
    #[prost(message, repeated, tag = "1")]
    pub images: Vec<Image>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RemoveImageRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RemoveImageResponse {}

/// The gRPC service and its methods.
const SERVICE: &str = "/runtime.v1.ImageService/";

/// A blocking CRI image client (its own small tokio runtime), like `crictl` would be.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    channel: Channel,
    timeout: Duration,
}

impl CriClient {
    /// Connects to a CRI socket (`/run/containerd/containerd.sock`).
    pub fn connect(socket: &Path) -> Result<Self, tonic::transport::Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime for the CRI client");
        let socket = socket.to_owned();
        // The URI is a placeholder: every connection is the unix socket.
        let channel = rt.block_on(
            Endpoint::from_static("http://cri.invalid").connect_with_connector(tower::service_fn(
                move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(socket).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                },
            )),
        )?;
        Ok(Self {
            rt,
            channel,
            timeout: Duration::from_secs(120),
        })
    }

    /// The deadline of each call (default 2 minutes).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `PullImage`: the daemon fetches and unpacks `image`, with `auth` if given. Returns the
    /// image id.
    pub fn pull_image(&self, image: &str, auth: Option<(&str, &str)>) -> Result<String, Status> {
        let req = PullImageRequest {
            image: Some(spec(image)),
            auth: auth.map(|(u, p)| AuthConfig {
                username: u.to_owned(),
                password: p.to_owned(),
            }),
        };
        let resp: PullImageResponse = self.call("PullImage", req)?;
        Ok(resp.image_ref)
    }

    /// `ImageStatus`: the stored image `image` refers to, if any.
    pub fn image_status(&self, image: &str) -> Result<Option<Image>, Status> {
        let resp: ImageStatusResponse = self.call(
            "ImageStatus",
            ImageStatusRequest {
                image: Some(spec(image)),
            },
        )?;
        Ok(resp.image)
    }

    /// `ListImages`.
    pub fn list_images(&self) -> Result<Vec<Image>, Status> {
        let resp: ListImagesResponse = self.call("ListImages", ListImagesRequest {})?;
        Ok(resp.images)
    }

    /// `RemoveImage`.
    pub fn remove_image(&self, image: &str) -> Result<(), Status> {
        let _: RemoveImageResponse = self.call(
            "RemoveImage",
            RemoveImageRequest {
                image: Some(spec(image)),
            },
        )?;
        Ok(())
    }

    fn call<Req, Resp>(&self, method: &str, req: Req) -> Result<Resp, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let path = PathAndQuery::try_from(format!("{SERVICE}{method}")).expect("gRPC path");
        let mut grpc = Grpc::new(self.channel.clone());
        let mut request = Request::new(req);
        request.set_timeout(self.timeout);
        self.rt.block_on(async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(format!("CRI channel not ready: {e}")))?;
            let resp = grpc
                .unary(request, path, ProstCodec::<Req, Resp>::default())
                .await?;
            Ok(resp.into_inner())
        })
    }
}

fn spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn pull_request_encodes_the_cri_field_numbers() {
        let req = PullImageRequest {
            image: Some(spec("a")),
            auth: Some(AuthConfig {
                username: "u".into(),
                password: "p".into(),
            }),
        };
        // field 1 (message: field 1 "a"), field 2 (message: field 1 "u", field 2 "p").
        assert_eq!(
            req.encode_to_vec(),
            [
                0x0a, 3, 0x0a, 1, b'a', 0x12, 6, 0x0a, 1, b'u', 0x12, 1, b'p'
            ]
        );
    }
}
