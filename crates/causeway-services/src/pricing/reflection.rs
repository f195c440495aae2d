//! Server reflection, `grpc.reflection.v1` and `v1alpha` (grpcurl and many tools still ask for
//! `v1alpha`), as the reflection protocol specifies it: a lookup that fails is answered on the
//! stream with an `ErrorResponse` (e.g. `NOT_FOUND` for an unknown symbol) and the stream stays
//! open for the next request. tonic-reflection instead ends the whole stream with the status, so
//! each request is handed to it alone, on a stream of its own, and a status it ends that stream
//! with becomes the `ErrorResponse`. Its index of files and symbols is used as it is.

use std::convert::Infallible;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use prost::Message;
use tonic::codegen::Service;
use tonic::{Code, Status};

/// The gRPC message prefix: compression flag and length.
const PREFIX: usize = 5;

/// Asks `inner` (tonic-reflection's server, at `path`) `request` alone; its one answer, or the
/// status it ended the call with.
async fn ask<S, Req, Resp>(mut inner: S, path: &'static str, request: &Req) -> Result<Resp, Status>
where
    S: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
    Req: Message,
    Resp: Message + Default,
{
    let encoded = request.encode_to_vec();
    let len = u32::try_from(encoded.len())
        .map_err(|_| Status::resource_exhausted("reflection request over 4 GiB"))?;
    let mut frame = BytesMut::with_capacity(PREFIX + encoded.len());
    frame.put_u8(0);
    frame.put_u32(len);
    frame.put_slice(&encoded);
    let call = http::Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Full::new(frame.freeze()))
        .map_err(|err| Status::internal(format!("reflection request: {err}")))?;
    std::future::poll_fn(|cx| inner.poll_ready(cx))
        .await
        .unwrap_or_else(|never| match never {});
    let response = inner
        .call(call)
        .await
        .unwrap_or_else(|never| match never {});
    // A trailers-only answer carries its status in the headers.
    if let Some(status) = Status::from_header_map(response.headers())
        && status.code() != Code::Ok
    {
        return Err(status);
    }
    let collected = response.into_body().collect().await?;
    if let Some(status) = collected.trailers().and_then(Status::from_header_map)
        && status.code() != Code::Ok
    {
        return Err(status);
    }
    let mut data = collected.to_bytes();
    if data.len() < PREFIX {
        return Err(Status::internal("reflection ended without an answer"));
    }
    data.advance(PREFIX);
    Resp::decode(data).map_err(|err| Status::internal(format!("reflection answer: {err}")))
}

/// One reflection version's wrapper; the versions' messages are alike but distinct types.
macro_rules! reflection_version {
    ($version:ident, $path:literal) => {
        pub mod $version {
            use std::convert::Infallible;

            use bytes::Bytes;
            use http_body_util::Full;
            use tokio::sync::mpsc;
            use tokio_stream::wrappers::ReceiverStream;
            use tonic::codegen::Service;
            use tonic::{Request, Response, Status, Streaming};
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::server_reflection_server::{
                ServerReflection, ServerReflectionServer,
            };
            use tonic_reflection::pb::$version::{
                ErrorResponse, ServerReflectionRequest, ServerReflectionResponse,
            };

            /// tonic-reflection's server for this version, answering request by request.
            pub struct Reflection<S> {
                inner: S,
            }

            /// Wraps `inner`, as `Builder::build_*` returned it, into the service to serve.
            pub fn service<S>(inner: S) -> ServerReflectionServer<Reflection<S>>
            where
                Reflection<S>: ServerReflection,
            {
                ServerReflectionServer::new(Reflection { inner })
            }

            #[tonic::async_trait]
            impl<S> ServerReflection for Reflection<S>
            where
                S: Service<
                        http::Request<Full<Bytes>>,
                        Response = http::Response<tonic::body::Body>,
                        Error = Infallible,
                    > + Clone
                    + Send
                    + Sync
                    + 'static,
                S::Future: Send,
            {
                type ServerReflectionInfoStream =
                    ReceiverStream<Result<ServerReflectionResponse, Status>>;

                async fn server_reflection_info(
                    &self,
                    request: Request<Streaming<ServerReflectionRequest>>,
                ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
                    let mut requests = request.into_inner();
                    let inner = self.inner.clone();
                    let (sender, receiver) = mpsc::channel(1);
                    tokio::spawn(async move {
                        loop {
                            let request = match requests.message().await {
                                Ok(Some(request)) => request,
                                Ok(None) => break,
                                Err(status) => {
                                    let _ = sender.send(Err(status)).await;
                                    break;
                                }
                            };
                            let answer = match super::ask(inner.clone(), $path, &request).await {
                                Ok(answer) => answer,
                                Err(status) => ServerReflectionResponse {
                                    valid_host: request.host.clone(),
                                    message_response: Some(MessageResponse::ErrorResponse(
                                        ErrorResponse {
                                            error_code: status.code() as i32,
                                            error_message: status.message().to_string(),
                                        },
                                    )),
                                    original_request: Some(request),
                                },
                            };
                            if sender.send(Ok(answer)).await.is_err() {
                                break;
                            }
                        }
                    });
                    Ok(Response::new(ReceiverStream::new(receiver)))
                }
            }
        }
    };
}

reflection_version!(
    v1,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
);
reflection_version!(
    v1alpha,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
);
